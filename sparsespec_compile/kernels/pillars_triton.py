"""Triton kernels of :func:`pillar_scores` and :func:`select_pillars`.

Scoring re-reads K of the verified context once per (request, KV head) and recomputes the verify queries'
probabilities from the saved log-sum-exp: ``exp(logit - lse)`` needs the *final* lse, which the attention
kernel only knows after its last key, so fusing it would mean keeping raw logits (Hq * q_len floats per key,
more bytes than the K row itself) — the two-pass form moves fewer bytes.

Selection is a per-(row, head) radix-free bisection on the float bits of the scores (non-negative floats
order like their int32 bit patterns): 31 counting passes find the b-th largest key, one compaction pass
writes the winners in ascending position order (ties to the lower position, like the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import interpreting



@triton.jit(do_not_specialize=["max_ctx", "sliding_window", "seq_bucket"])
def _scores_kernel(
    scores, q, k_cache, lse, query_start_loc, seq_lens, block_tables, rows,
    max_ctx, scale, softcap, sliding_window, seq_bucket,
    stride_qt, stride_qh, stride_cp, stride_co, stride_ch, stride_bt, stride_sj, stride_sh,
    HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    jrow = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)
    r = tl.load(rows + jrow)
    q_start = tl.load(query_start_loc + r)
    q_len = tl.load(query_start_loc + r + 1) - q_start
    seq_len = tl.load(seq_lens + r)
    c = tl.minimum(seq_len - q_len, max_ctx)  # candidates: the context before the verify chunk
    pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptr = scores + jrow.to(tl.int64) * stride_sj + kvh * stride_sh + pos
    if tile * BLOCK_N >= c:
        tl.store(out_ptr, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=pos < max_ctx)
        return
    pos_ok = pos < c
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    page = tl.load(block_tables + r.to(tl.int64) * stride_bt + pos // PAGE_SIZE, mask=pos_ok, other=0).to(tl.int64)
    kv_off = page * stride_cp + (pos % PAGE_SIZE) * stride_co + kvh * stride_ch
    kt = tl.load(k_cache + kv_off[None, :] + offs_d[:, None], mask=pos_ok[None, :] & d_ok[:, None], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    g = offs_m % GROUP_PAD
    head = kvh * GROUP + g
    for q0 in range(0, q_len, BLOCK_Q):  # a verify chunk (k + 1 queries) is one iteration
        tok = q0 + offs_m // GROUP_PAD
        row_ok = (tok < q_len) & (g < GROUP)
        qrow = (q_start + tok).to(tl.int64)
        qt = tl.load(q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
        lse_r = tl.load(lse + qrow * HQ + head, mask=row_ok, other=float("inf"))
        lse_r = tl.where(lse_r == float("-inf"), float("inf"), lse_r) * 1.4426950408889634  # a row that saw nothing adds 0
        s = tl.dot(qt, kt, input_precision=DOT_PREC) * scale
        if USE_SOFTCAP:
            e = tl.exp2((2.0 * 1.4426950408889634 / softcap) * s)
            s = softcap * (1.0 - 2.0 / (e + 1.0))
        p = tl.exp2(s * 1.4426950408889634 - lse_r[:, None])
        ok = row_ok[:, None] & pos_ok[None, :]
        if USE_WINDOW:
            ok = ok & (pos[None, :] > (seq_len - q_len + tok)[:, None] - sliding_window)
        total += tl.sum(tl.where(ok, p, 0.0), 0)
    val = total / (q_len * GROUP).to(tl.float32)
    tl.store(out_ptr, tl.where(pos_ok, val, float("-inf")), mask=pos < max_ctx)


_scores_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bn, w, s in ((64, 4, 2), (128, 8, 2))],
    key=["HEAD_DIM", "BLOCK_M", "seq_bucket", "PAGE_SIZE"],
    do_bench=lambda fn, quantiles=None: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
)(_scores_kernel)


def pillar_scores_triton(q, k_cache, *, query_start_loc, seq_lens, block_tables, rows, lse, scale, softcap=0.0,
                         sliding_window=-1, max_ctx, block_n: int | None = None, out: torch.Tensor | None = None):
    T, Hq, D = q.shape
    _, P, Hkv, _ = k_cache.shape
    Rv = rows.shape[0]
    scores = torch.empty(Rv, Hkv, max_ctx, dtype=torch.float32, device=q.device) if out is None else out
    if Rv == 0 or max_ctx == 0:
        return scores
    gp = triton.next_power_of_2(Hq // Hkv)
    bq = max(1, 16 // gp, min(16, 128 // gp))
    args = (scores, q, k_cache, lse.contiguous(), query_start_loc, seq_lens, block_tables, rows, max_ctx,
            float(scale), float(softcap) if softcap > 0 else 1.0, int(sliding_window),
            triton.next_power_of_2(max_ctx), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), block_tables.stride(0), scores.stride(0), scores.stride(1))
    meta = dict(HQ=Hq, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), GROUP=Hq // Hkv, GROUP_PAD=gp,
                BLOCK_Q=bq, BLOCK_M=bq * gp, PAGE_SIZE=P, USE_SOFTCAP=softcap > 0, USE_WINDOW=sliding_window > 0,
                UPCAST=interpreting(), DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if interpreting() or block_n is not None:
        bn = block_n or 32
        _scores_kernel[(Rv, Hkv, triton.cdiv(max_ctx, bn))](*args, BLOCK_N=bn, num_warps=4, **meta)
    else:
        grid = lambda m: (Rv, Hkv, triton.cdiv(max_ctx, m["BLOCK_N"]))  # noqa: E731
        _scores_kernel_tuned[grid](*args, **meta)
    return scores


@triton.jit
def _key(scores_row, pos, ctx, n_recent):
    """int32 ranking key: invalid -1 < valid score bits (non-negative floats order like ints) < forced newest."""
    s = tl.load(scores_row + pos, mask=pos < ctx, other=0.0).to(tl.float32)
    bits = tl.minimum(s.to(tl.int32, bitcast=True), 0x7F7FFFFF)  # +inf ranks as the largest finite; nan and <= 0 as 0
    key = tl.where(s > 0, bits, 0)
    key = tl.where(pos >= ctx - n_recent, 0x7F800000, key)
    return tl.where(pos < ctx, key, -1)


# The b-th largest key is found by a WAYS-ary search: each pass counts the row against WAYS thresholds at once and
# keeps the interval between the last one that holds b keys and the first that does not. There is one program per
# (request, KV head), about 18 in a B 64, k = 8 step, so the time is the chain of dependent chunk loads and
# reductions: passes x chunks. Plain bisection (31 passes of 4,096-key chunks) took 115 us in the H200 profile of
# such a step. A [WAYS, BLOCK] comparison of 16k int32 keeps 64 values a thread (8 warps, no spills: ptxas -v):
# 16 ways x 1,024 keys (8 passes) for rows up to 1,024 keys, else 4 ways x 4,096 (16 passes): 8 / 16 / 32 chunk
# passes at 1k / 4k / 8k keys instead of 31 / 31 / 62.
_KEY_RANGE = 0x7F800000


def _select_plan(n: int, interpret: bool) -> tuple[int, int, int]:
    """(ways, block, passes) for rows of ``n`` keys. The interpreter takes small chunks; both widths still run."""
    ways = 16 if n <= (128 if interpret else 1024) else 4
    block = 64 if interpret else (min(1024, triton.next_power_of_2(n)) if ways == 16 else 4096)
    passes = next(p for p in range(1, 33) if ways ** p > _KEY_RANGE)
    return ways, block, passes


@triton.jit(do_not_specialize=["recent", "N"])
def _select_kernel(indices, scores, ctx_lens, budget, recent, N, stride_sj, stride_sh, stride_ij, stride_ih,
                   BLOCK: tl.constexpr, WAYS: tl.constexpr, PASSES: tl.constexpr):
    j = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.minimum(tl.load(ctx_lens + j).to(tl.int32), N)
    b = tl.minimum(tl.load(budget + j).to(tl.int32), ctx)
    n_recent = tl.minimum(b, recent)
    row = scores + j.to(tl.int64) * stride_sj + h * stride_sh
    offs = tl.arange(0, BLOCK)
    ways = tl.arange(0, WAYS).to(tl.int64) + 1
    # T = the largest key with count(key >= T) >= b (the b-th largest key); invariant: lo <= T <= hi, and the
    # interval shrinks below 1 / WAYS of itself each pass (int64: lo + step * WAYS may pass int32's range).
    lo = (b * 0).to(tl.int64)
    hi = lo + 0x7F800000  # _KEY_RANGE: forced newest
    for _ in range(PASSES):
        step = (hi - lo + WAYS - 1) // WAYS
        cand = tl.minimum(lo + step * ways, hi)  # <= hi <= 0x7F800000: the comparisons can run in int32
        cand32 = cand.to(tl.int32)
        cnt = tl.zeros([WAYS], dtype=tl.int32)
        for s0 in range(0, ctx, BLOCK):
            key = _key(row, s0 + offs, ctx, n_recent)
            cnt += tl.sum((key[None, :] >= cand32[:, None]).to(tl.int32), 1)
        ok = cnt >= b  # true for a prefix of the (ascending) candidates
        new_lo = tl.max(tl.where(ok, cand, lo), 0)
        hi = tl.minimum(hi, tl.min(tl.where(ok, hi + 1, cand), 0) - 1)
        lo = new_lo
    thr = lo.to(tl.int32)
    n_gt = b * 0
    for s0 in range(0, ctx, BLOCK):
        n_gt += tl.sum((_key(row, s0 + offs, ctx, n_recent) > thr).to(tl.int32), 0)
    need_eq = b - n_gt  # how many of the keys equal to T are kept: the lowest positions
    out = indices + j.to(tl.int64) * stride_ij + h * stride_ih
    n_sel = b * 0
    n_eq = b * 0
    for s0 in range(0, ctx, BLOCK):
        pos = s0 + offs
        key = _key(row, pos, ctx, n_recent)
        eq = (key == thr).to(tl.int32)
        eq_rank = n_eq + tl.cumsum(eq, 0) - eq
        sel = (key > thr) | ((eq == 1) & (eq_rank < need_eq))
        sel_i = sel.to(tl.int32)
        dst = n_sel + tl.cumsum(sel_i, 0) - sel_i
        tl.store(out + dst, pos, mask=sel)
        n_sel += tl.sum(sel_i, 0)
        n_eq += tl.sum(eq, 0)


def select_pillars_triton(scores, ctx_lens, budget, recent, max_budget, block: int | None = None):
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    Rv, Hkv, N = scores.shape
    indices = torch.zeros(Rv, Hkv, max_budget, dtype=torch.int32, device=scores.device)
    lengths = torch.minimum(budget.to(torch.int32), ctx_lens.to(torch.int32).clamp(max=N)).clamp(min=0)
    if Rv == 0 or N == 0:
        return indices, lengths
    ways, blk, passes = _select_plan(N, interpreting())
    blk = block or blk
    _select_kernel[(Rv, Hkv)](indices, scores, ctx_lens, budget, int(recent), N, scores.stride(0), scores.stride(1),
                              indices.stride(0), indices.stride(1), BLOCK=blk, WAYS=ways, PASSES=passes,
                              num_warps=1 if interpreting() else (8 if ways * blk >= 8192 else 4))
    return indices, lengths
