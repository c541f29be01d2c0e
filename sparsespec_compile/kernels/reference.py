"""Pure-PyTorch references of every kernel: the test oracle and the CPU fallback.

They favour clarity over speed (a Python loop over requests, fp32 math) and sync with the host freely.
Shapes: ``T`` query tokens (padding included), ``R`` requests, ``Hq``/``Hkv`` query/KV heads, ``G = Hq // Hkv``,
``D`` head dim, ``P`` page size. Query head ``h`` reads KV head ``h // G`` (Hugging Face's ``repeat_kv`` order).
"""

from __future__ import annotations

import math

import torch

# Queries per chunk in the reference: bounds the [Hq, chunk, L] fp32 logits of long prefills.
_QUERY_CHUNK = 256


def write_kv_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    # k_cache: [num_pages, P, Hkv, D]; k: [T, Hkv, D]; slot_mapping: [T], -1 = padding (skipped)
    P = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache[slots // P, slots % P] = k[valid].to(k_cache.dtype)
    v_cache[slots // P, slots % P] = v[valid].to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` logical positions of one request: [n, Hkv, D] fp32."""
    P = cache.shape[1]
    pos = torch.arange(n, device=cache.device)
    pages = block_table[pos // P].long()
    return cache[pages, pos % P].float()


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    # q: [n, Hkv, G, D] fp32, k: [L, Hkv, D] fp32 -> [Hkv, G, n, L]
    s = torch.einsum("nhgd,lhd->hgnl", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    return s


def _allowed(qpos: torch.Tensor, L: int, sliding_window: int) -> torch.Tensor:
    """Causal (and sliding-window) mask [n, L] for queries at positions ``qpos``."""
    pos = torch.arange(L, device=qpos.device)
    allowed = pos[None, :] <= qpos[:, None]
    if sliding_window > 0:
        allowed &= pos[None, :] > qpos[:, None] - sliding_window
    return allowed


def unified_attention_reference(q, k_cache, v_cache, *, query_start_loc, seq_lens, block_tables, scale, softcap=0.0,
                                sliding_window=-1, is_sparse=None, draft_start=None, pillar_indices=None,
                                pillar_lengths=None, pillar_rows=None):
    """Returns (out [T, Hq, D] in q's dtype, lse [T, Hq] fp32). Rows that attend nothing (padding) get 0 / -inf."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    out = torch.zeros(T, Hq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((T, Hq), -math.inf, dtype=torch.float32, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    sparse = is_sparse.tolist() if is_sparse is not None else [False] * len(lens)
    for r, L in enumerate(lens):
        s, e = qsl[r], qsl[r + 1]
        n = e - s
        if n <= 0 or L <= 0:
            continue
        K = _gather_context(k_cache, block_tables[r], L)  # [L, Hkv, D]
        V = _gather_context(v_cache, block_tables[r], L)
        sel = None
        if sparse[r]:
            # attended set per KV head: the pillars plus every position >= draft_start
            pos = torch.arange(L, device=q.device)
            sel = (pos >= int(draft_start[r])).expand(Hkv, L).clone()  # [Hkv, L]
            pr = int(pillar_rows[r]) if pillar_rows is not None else r
            idx = pillar_indices[pr, :, : int(pillar_lengths[pr])].long()
            sel.scatter_(1, idx.clamp(max=L - 1), True)
        for c0 in range(0, n, _QUERY_CHUNK):
            c1 = min(n, c0 + _QUERY_CHUNK)
            qr = q[s + c0 : s + c1].float().reshape(c1 - c0, Hkv, G, D)
            logits = _logits(qr, K, scale, softcap)  # [Hkv, G, c, L]
            qpos = torch.arange(L - n + c0, L - n + c1, device=q.device)
            allowed = _allowed(qpos, L, sliding_window)[None]  # [1, c, L]
            if sel is not None:
                allowed = allowed & sel[:, None, :]  # [Hkv, c, L]
            logits = logits.masked_fill(~allowed[:, None], -math.inf)
            m = torch.logsumexp(logits, dim=-1)  # [Hkv, G, c]
            p = torch.exp(logits - torch.where(torch.isinf(m), 0.0, m)[..., None])
            o = torch.einsum("hgnl,lhd->nhgd", p, V).reshape(c1 - c0, Hq, D)
            out[s + c0 : s + c1] = o
            lse[s + c0 : s + c1] = m.permute(2, 0, 1).reshape(c1 - c0, Hq)
    return out.to(q.dtype), lse


def pillar_scores_reference(q, k_cache, *, query_start_loc, seq_lens, block_tables, rows, lse, scale, softcap=0.0,
                            sliding_window=-1, max_ctx):
    """scores [Rv, Hkv, max_ctx] fp32: mean over the group's heads and the verify queries of exp(logit - lse),
    for positions < c = seq_len - q_len (the context before the verify chunk); -inf elsewhere."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    rows_l = rows.tolist()
    scores = torch.full((len(rows_l), Hkv, max_ctx), -math.inf, dtype=torch.float32, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for j, r in enumerate(rows_l):
        s, e = qsl[r], qsl[r + 1]
        n, L = e - s, lens[r]
        c = min(L - n, max_ctx)
        if c <= 0 or n <= 0:
            continue
        K = _gather_context(k_cache, block_tables[r], c)  # [c, Hkv, D]
        qr = q[s:e].float().reshape(n, Hkv, G, D)
        logits = _logits(qr, K, scale, softcap)  # [Hkv, G, n, c]
        allowed = _allowed(torch.arange(L - n, L, device=q.device), c, sliding_window)  # [n, c]
        lse_r = lse[s:e].float().reshape(n, Hkv, G).permute(1, 2, 0)  # [Hkv, G, n]
        p = torch.exp(logits - lse_r[..., None]).masked_fill(~allowed, 0.0)
        scores[j, :, :c] = p.mean(dim=(1, 2))
    return scores


def select_pillars_reference(scores, ctx_lens, budget, recent, max_budget, sinks=None):
    """(indices [Rv, Hkv, max_budget] int32 sorted ascending, 0 beyond lengths; lengths [Rv] int32).

    Per (row, head): the ``b = min(budget, ctx_len)`` best positions < ctx_len, the ``min(recent, b)`` newest
    always among them. Ties are broken towards the lower position. With ``sinks`` (the hybrid draft), ``recent`` and
    ``sinks`` are [Rv, Hkv] tensors: the first ``min(sinks, b)`` and the ``min(recent, b - sinks)`` newest forced."""
    Rv, Hkv, N = scores.shape
    dev = scores.device
    pos = torch.arange(N, device=dev)
    ctx = ctx_lens.long().clamp(max=N)[:, None, None]
    b = torch.minimum(budget.long(), ctx_lens.long().clamp(max=N))  # [Rv]
    if isinstance(recent, torch.Tensor):
        n_sinks = torch.minimum(sinks.long(), b[:, None])
        n_recent = torch.minimum(recent.long(), b[:, None] - n_sinks)[..., None]
        n_sinks = n_sinks[..., None]
    else:
        n_recent, n_sinks = b.clamp(max=recent)[:, None, None], 0
    valid = pos < ctx
    forced = valid & ((pos >= ctx - n_recent) | (pos < n_sinks))
    # key: forced > any valid score > invalid; stable sort keeps lower positions first among ties. Scores are mean
    # probabilities (>= 0); like the kernel, +inf ranks as the largest finite value (below the forced newest) and
    # NaN or a score <= 0 as 0.
    s = scores.float()
    key = torch.where(valid, torch.where(s > 0, s.clamp(max=torch.finfo(torch.float32).max), 0.0), -math.inf)
    key = torch.where(forced, math.inf, key)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # [Rv, Hkv, N]
    k = min(max_budget, N)
    top = order[..., :k]
    keep = torch.arange(k, device=dev)[None, None, :] < b[:, None, None]
    top = torch.where(keep, top, N)  # sentinel sorts last
    top = torch.sort(top, dim=-1).values
    top = torch.where(top == N, 0, top)
    indices = torch.zeros(Rv, Hkv, max_budget, dtype=torch.int32, device=dev)
    indices[..., :k] = top.to(torch.int32)
    return indices, b.to(torch.int32)


def naive_dense_attention(q, k, v, scale, mask, softcap=0.0):
    """softmax(scale * q k^T) v for one request in fp64, the oracle's oracle: q [n, Hq, D], k/v [L, Hkv, D],
    mask [n, L] or [Hq, n, L] bool (True = attend)."""
    G = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(G, dim=1)
    v = v.double().repeat_interleave(G, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask.expand_as(s), -math.inf)
    return torch.einsum("hnl,lhd->nhd", torch.softmax(s, dim=-1), v)
