"""Unified paged attention over a mixed ragged batch: prefill chunks, verify chunks (full) and draft tokens
(PillarAttn sparse) in one work-balanced launch."""

from __future__ import annotations

import torch

from ._validate import check_impl, check_paged_metadata, check_sparse_metadata
from .attention_plan import AttentionPlan
from .reference import unified_attention_reference


def unified_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                      max_query_len: int, max_seq_len: int, scale: float, softcap: float = 0.0,
                      sliding_window: int = -1, is_sparse: torch.Tensor | None = None,
                      draft_start: torch.Tensor | None = None, pillar_indices: torch.Tensor | None = None,
                      pillar_lengths: torch.Tensor | None = None, pillar_rows: torch.Tensor | None = None,
                      return_lse: bool = False, impl: str = "triton", plan: AttentionPlan | None = None):
    """Attention of the ``T`` query tokens ``q: [T, Hq, D]`` of ``R`` requests over their paged context.

    Request ``r`` owns tokens ``query_start_loc[r]:query_start_loc[r + 1]`` (``q_len``); its context is
    ``seq_lens[r]`` tokens (the new ones included, already written); its query ``i`` sits at position
    ``p = seq_lens[r] - q_len + i`` and sees positions ``<= p`` (and ``> p - sliding_window`` when > 0).
    A row with ``is_sparse[r]`` sees only ``pillar_indices[r, h_kv, :pillar_lengths[r]]`` (sorted, all
    ``< draft_start[r]``) and every position ``>= draft_start[r]``, under the same causal/window rule.
    logits = scale * q.k, softcapped when ``softcap > 0``; softmax in fp32.
    ``pillar_rows: [R]`` (optional) reads request r's pillars from row ``pillar_rows[r]`` of ``pillar_indices:
    [S, Hkv, Bmax]`` and ``pillar_lengths: [S]`` instead of row r — so the op can pass
    ``PillarStore.indices[layer]``, ``PillarStore.lengths`` and ``ForwardContext.pillar_slot`` with no gather.

    Returns ``out: [T, Hq, D]`` in q's dtype (zeros for padding tokens past ``query_start_loc[R]``) and, with
    ``return_lse``, ``lse: [T, Hq]`` fp32, the natural log-sum-exp of the logits (-inf for padding).
    ``max_query_len`` / ``max_seq_len`` are host ints bounding q_len and seq_lens (grid sizes, no sync).
    ``plan`` (Triton only): the step's work plan from :func:`attention_plan` over the same metadata, built once per
    step and shared by every layer; built per call when None.
    """
    T, Hq, Hkv, D, R = check_paged_metadata(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables)
    sparse = check_sparse_metadata(R, Hkv, q.device, is_sparse, draft_start, pillar_indices, pillar_lengths,
                                   pillar_rows)
    check_impl(impl, q)
    kw = dict(query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables, scale=float(scale),
              softcap=float(softcap), sliding_window=int(sliding_window))
    if sparse:
        kw.update(is_sparse=is_sparse, draft_start=draft_start, pillar_indices=pillar_indices,
                  pillar_lengths=pillar_lengths, pillar_rows=pillar_rows)
    if impl == "reference":
        out, lse = unified_attention_reference(q, k_cache, v_cache, **kw)
    else:
        from .attention_triton import unified_attention_triton

        out, lse = unified_attention_triton(q, k_cache, v_cache, max_query_len=int(max_query_len),
                                            max_seq_len=int(max_seq_len), plan=plan, **kw)
    return (out, lse) if return_lse else out
