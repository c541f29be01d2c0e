"""PillarAttn selection: score the verified context by the verify queries' attention, keep the top B."""

from __future__ import annotations

import torch

from ._validate import check_impl, check_paged_metadata, check_tensor
from .reference import pillar_scores_reference, select_pillars_reference


def pillar_scores(q: torch.Tensor, k_cache: torch.Tensor, *, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                  block_tables: torch.Tensor, rows: torch.Tensor, lse: torch.Tensor, scale: float,
                  softcap: float = 0.0, sliding_window: int = -1, max_ctx: int | None = None,
                  max_query_len: int | None = None, impl: str = "triton",
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Full-attention probability of each context token, averaged over the GQA group and the verify queries.

    For scored request ``r = rows[j]`` (int64 indices into the R requests) the candidates are positions
    ``< c = seq_lens[r] - q_len[r]`` (the context before its verify chunk, the next cycle's draft_start);
    ``score[j, h, t] = mean over the group's q heads and the q_len queries of exp(logit(q, k_t) - lse)`` with
    ``lse: [T, Hq]`` from :func:`unified_attention` (``return_lse=True``). Positions ``>= c`` (and
    ``>= max_ctx``) are -inf.

    ``max_ctx`` is the last dim of the result; pass a host bound (e.g. ``ForwardContext.max_seq_len``) to
    avoid a device sync, or leave None to use the largest ``c`` among the rows (syncs).
    ``max_query_len``: a host bound on the scored rows' q_len (e.g. ``ForwardContext.max_query_len``); with it the
    Triton kernel reads each K tile once for all of a verify chunk's queries in one block (faster; see
    pillars_triton.score_blocks), without it it loops over blocks of queries. A row longer than the bound is an error
    the kernel cannot see: pass a true bound.
    Returns ``scores: [Rv, Hkv, max_ctx]`` fp32, written into ``out`` when given (contiguous, that shape).
    """
    T, Hq, Hkv, D, R = check_paged_metadata(q, k_cache, k_cache, query_start_loc, seq_lens, block_tables)
    check_tensor("rows", rows, ndim=1, dtypes=(torch.int64, torch.int32), device=q.device)
    check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,), device=q.device)
    if lse.shape != (T, Hq):
        raise ValueError(f"lse must be [T, Hq] = {(T, Hq)}, got {tuple(lse.shape)}")
    check_impl(impl, q)
    if max_ctx is None:
        qlen = query_start_loc[1:] - query_start_loc[:-1]
        max_ctx = int((seq_lens - qlen)[rows.long()].max().clamp(min=1)) if rows.numel() else 1
    kw = dict(query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables, rows=rows, lse=lse,
              scale=float(scale), softcap=float(softcap), sliding_window=int(sliding_window), max_ctx=int(max_ctx))
    if out is not None:
        check_tensor("out", out, ndim=3, dtypes=(torch.float32,), device=q.device)
        if out.shape != (rows.shape[0], Hkv, max_ctx) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous [{rows.shape[0]}, {Hkv}, {max_ctx}] tensor, got "
                             f"{tuple(out.shape)}")
    if impl == "reference":
        scores = pillar_scores_reference(q, k_cache, **kw)
        return scores if out is None else out.copy_(scores)
    from .pillars_triton import pillar_scores_triton

    if max_query_len is not None and max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    return pillar_scores_triton(q, k_cache, out=out, max_query_len=max_query_len, **kw)


def select_pillars(scores: torch.Tensor, ctx_lens: torch.Tensor, budget: torch.Tensor, recent: int | torch.Tensor,
                   max_budget: int, impl: str = "triton", sinks: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``b`` positions per (row, KV head), ``b = min(budget[j], ctx_lens[j])``, the ``min(recent, b)`` newest
    positions ``< ctx_lens[j]`` always among them; ties go to the lower position.

    ``scores: [Rv, Hkv, N]`` (from :func:`pillar_scores`), ``ctx_lens, budget: [Rv]`` ints, ``budget <=
    max_budget``. Returns ``indices: [Rv, Hkv, max_budget]`` int32 sorted ascending (0 past ``lengths``) and
    ``lengths: [Rv]`` int32 — the layout :func:`unified_attention` reads as ``pillar_indices`` / ``pillar_lengths``.

    The hybrid draft's split (kernels/hybrid.py): ``recent`` and ``sinks`` as ``[Rv, Hkv]`` int tensors, the first
    ``min(sinks, b)`` positions and the ``min(recent, b - sinks)`` newest forced per (row, head), the rest by score.
    """
    check_tensor("scores", scores, ndim=3, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    Rv = scores.shape[0]
    for name, t in (("ctx_lens", ctx_lens), ("budget", budget)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32, torch.int64), device=scores.device)
        if t.shape[0] != Rv:
            raise ValueError(f"{name} must have Rv = {Rv} entries, got {t.shape[0]}")
    split = isinstance(recent, torch.Tensor)
    if split:
        for name, t in (("recent", recent), ("sinks", sinks)):
            check_tensor(name, t, ndim=2, dtypes=(torch.int32, torch.int64), device=scores.device)
            if t.shape != scores.shape[:2]:
                raise ValueError(f"{name} must be [Rv, Hkv] = {tuple(scores.shape[:2])}, got {tuple(t.shape)}")
    elif sinks is not None:
        raise ValueError("sinks needs recent as a [Rv, Hkv] tensor too (the hybrid split)")
    if max_budget < 1 or (not split and recent < 0):
        raise ValueError(f"need max_budget >= 1 and recent >= 0, got {max_budget} and {recent}")
    check_impl(impl, scores)
    recent = recent if split else int(recent)
    if impl == "reference":
        return select_pillars_reference(scores, ctx_lens, budget, recent, int(max_budget), sinks=sinks)
    from .select_triton import select_pillars_triton

    return select_pillars_triton(scores, ctx_lens, budget, recent, int(max_budget), sinks=sinks)
