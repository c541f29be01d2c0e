"""The attention work plan (:func:`.attention_plan.plan_attention`) as one single-program Triton launch.

The torch form is ~30 small kernels: 0.10-0.13 ms per step replayed in a CUDA graph on the H200 (bench/kernels.py
step section, first run), as much as a whole layer's attention in a decode step. Here one program walks the rows
twice: pass 1 numbers the units (an exclusive scan of the rows' q-block counts) and computes each unit's key count
and the step's total; pass 2 cuts each unit into items and scatters them. Same result as the torch form, field for
field (tests/kernels/test_attention_plan.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import interpreting
from .attention_plan import AttentionPlan, item_capacity, unit_capacity


@triton.jit(do_not_specialize=["R", "U", "W", "n_counters", "window", "max_pillars", "target", "min_chunk",
                               "max_chunks", "forced_chunk", "compute_bound"])
def _plan_kernel(items, units, unit_keys, chunk_out, counters, query_start_loc, seq_lens, is_sparse, draft_start,
                 pillar_lengths, pillar_rows, R, U, W, n_counters, window, max_pillars, target, min_chunk, max_chunks,
                 forced_chunk, compute_bound, BLOCK_Q: tl.constexpr, HAS_SPARSE: tl.constexpr, USE_WINDOW: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    # pass 1: rows -> units (row, q_block) in order, each unit's virtual key count, the step's total
    total = tl.sum(offs * 0, 0).to(tl.int64)
    n_units = tl.sum(offs * 0, 0)
    for r0 in range(0, R, BLOCK):
        r = r0 + offs
        ok = r < R
        q0 = tl.load(query_start_loc + r, mask=ok, other=0)
        q_len = tl.maximum(tl.load(query_start_loc + r + 1, mask=ok, other=0) - q0, 0)
        L = tl.load(seq_lens + r, mask=ok, other=0)
        nqb = tl.where(ok & (L > 0), (q_len + BLOCK_Q - 1) // BLOCK_Q, 0)
        ustart = n_units + tl.cumsum(nqb, 0) - nqb
        if HAS_SPARSE:
            sp = tl.load(is_sparse + r, mask=ok, other=0) != 0
            prow = tl.load(pillar_rows + r, mask=ok, other=0)
            n_pil = tl.minimum(tl.maximum(tl.load(pillar_lengths + prow, mask=ok, other=0), 0), max_pillars)
            dstart = tl.load(draft_start + r, mask=ok, other=0)
        for qb in range(0, tl.max(nqb, 0)):
            m = qb < nqb
            first_q = L - q_len + qb * BLOCK_Q
            last = tl.minimum(first_q + BLOCK_Q, L) - 1
            lo = first_q * 0
            if USE_WINDOW:
                lo = tl.maximum(first_q - window + 1, 0)
            n = last + 1 - lo
            if HAS_SPARSE:
                n = tl.where(sp, n_pil + tl.maximum(last + 1 - dstart, 0), n)
            n = tl.maximum(n, 0)
            u = ustart + qb
            tl.store(units + u * 4, r, mask=m)
            tl.store(units + u * 4 + 1, r * 0 + qb, mask=m)
            tl.store(unit_keys + u, n, mask=m)
            total += tl.sum(tl.where(m, n, 0), 0).to(tl.int64)
        n_units += tl.sum(nqb, 0)
    fill = (total + target - 1) // target  # the rule of attention_plan.plan_attention
    if compute_bound != 0:
        if n_units >= target:
            fill = 4 * ((total + n_units - 1) // n_units)
    chunk = tl.maximum(fill, min_chunk)
    if forced_chunk > 0:
        chunk = total * 0 + forced_chunk
    tl.store(chunk_out, chunk)
    tl.debug_barrier()  # pass 2 reads what other threads stored in pass 1
    # pass 2: units -> items; unit u's items are first[u] .. first[u] + n_c[u]
    n_items = n_units * 0
    for u0 in range(0, n_units, BLOCK):
        u = u0 + offs
        ok = u < n_units
        row = tl.load(units + u * 4, mask=ok, other=-1)
        qb = tl.load(units + u * 4 + 1, mask=ok, other=0)
        n = tl.load(unit_keys + u, mask=ok, other=0).to(tl.int64)
        n_c = tl.where(ok, tl.minimum(tl.maximum((n + chunk - 1) // chunk, 1), max_chunks), 0).to(tl.int32)
        first = n_items + tl.cumsum(n_c, 0) - n_c
        tl.store(units + u * 4 + 2, first, mask=ok)
        tl.store(units + u * 4 + 3, n_c, mask=ok)
        for c in range(0, tl.max(n_c, 0)):
            m = c < n_c
            w = first + c
            tl.store(items + w * 4, row, mask=m)
            tl.store(items + w * 4 + 1, qb, mask=m)
            tl.store(items + w * 4 + 2, n_c * 0 + c, mask=m)
            tl.store(items + w * 4 + 3, n_c, mask=m)
        n_items += tl.sum(n_c, 0)
    _pad_records(units, n_units, U, BLOCK)
    _pad_records(items, n_items, W, BLOCK)
    for i0 in range(0, n_counters, BLOCK):  # the attention kernel's merge counts start at 0 in every step
        i = i0 + offs
        tl.store(counters + i, i * 0, mask=i < n_counters)


@triton.jit
def _pad_records(records, n_real, capacity, BLOCK: tl.constexpr):
    """(-1, 0, 0, 0) into records n_real .. capacity of a [capacity, 4] table."""
    offs = tl.arange(0, BLOCK)
    for i0 in range(0, capacity, BLOCK):
        i = i0 + offs
        m = (i >= n_real) & (i < capacity)
        tl.store(records + i * 4, i * 0 - 1, mask=m)
        tl.store(records + i * 4 + 1, i * 0, mask=m)
        tl.store(records + i * 4 + 2, i * 0, mask=m)
        tl.store(records + i * 4 + 3, i * 0, mask=m)


def plan_attention_triton(query_start_loc, seq_lens, num_tokens: int, block_q: int, *, target_items: int,
                          min_chunk: int, max_chunks: int = 64, sliding_window: int = -1, is_sparse=None,
                          draft_start=None, pillar_lengths=None, pillar_rows=None, max_pillars: int = 0,
                          chunk_keys: int | None = None, compute_bound: bool = False,
                          num_kv_heads: int = 1) -> AttentionPlan:
    """:func:`.attention_plan.plan_attention` in one launch (same arguments, same result), with the merge counters
    of ``num_kv_heads`` heads zeroed in the same launch."""
    R = seq_lens.shape[0]
    dev = seq_lens.device
    U = unit_capacity(num_tokens, R, block_q)
    W = item_capacity(U, target_items, max_chunks, forced=chunk_keys is not None)
    items = torch.empty(W, 4, dtype=torch.int32, device=dev)
    units = torch.empty(U, 4, dtype=torch.int32, device=dev)
    unit_keys = torch.empty(U, dtype=torch.int32, device=dev)
    chunk = torch.empty((), dtype=torch.int64, device=dev)
    counters = torch.empty(W, num_kv_heads, dtype=torch.int32, device=dev)
    has_sparse = is_sparse is not None
    if has_sparse and pillar_rows is None:
        pillar_rows = torch.arange(R, device=dev, dtype=torch.int32)
    dummy = seq_lens
    _plan_kernel[(1,)](items, units, unit_keys, chunk, counters, query_start_loc, seq_lens,
                       is_sparse if has_sparse else dummy, draft_start if has_sparse else dummy,
                       pillar_lengths if has_sparse else dummy, pillar_rows if has_sparse else dummy,
                       R, U, W, counters.numel(), int(sliding_window), int(max_pillars), int(target_items),
                       int(min_chunk),
                       int(max_chunks), int(chunk_keys or 0), int(compute_bound), BLOCK_Q=block_q,
                       HAS_SPARSE=has_sparse,
                       USE_WINDOW=sliding_window > 0, BLOCK=64 if interpreting() else 256,
                       num_warps=1 if interpreting() else 4)
    return AttentionPlan(items=items, units=units, block_q=block_q, chunk=chunk, counters=counters)
