"""The work plan of one unified-attention launch: every row's own key range cut into chunks of about equal work.

A step mixes rows whose key ranges differ by 100x: a PillarAttn draft reads ~B pillars + a short dense tail, a
verify chunk or a decode reads its whole context. One split count for the whole launch (flash-decoding) either
leaves the long rows as stragglers or cuts the short ones into slivers whose fixed cost (metadata loads, the
request search, fp32 partials and their merge) dominates: a B 256, k = 8 SmolLM2 step spent 3.4 ms in attention
against 2.3 ms for a stride-0 step that reads 9x the bytes (H200 profile, bench/RESULTS.md). As in FlashInfer's
persistent ``BatchAttention`` plan, the chunk size here comes from the step's *total* work and the number of
programs the device keeps in flight; a row is cut only if it is longer than one chunk, and only cut rows are
merged.

Units and items:

* the chunk is ``ceil(total / target_items)`` keys (each item about the work of one program slot of the device:
  the makespan bound), never below ``min_chunk``. In a step with prefill chunks (compute-bound q-blocks) whose units
  already fill the device, it is 4x the mean unit: only outliers are cut, as flash-decoding never split such steps
  (cutting every long q-block of a B 4 x 2,048 SmolLM2 prefill measured 1.26x slower on the H200). Without that
  exception in decode steps, a Qwen3-8B k = 8 step (38 units for a target of 33) left its 16k-key verify units whole
  and ran 1.8x slower (bench/RESULTS.md);
* a *unit* is (row r, q-block qb): up to ``block_q`` consecutive queries of one row, the GQA group of one KV head
  (the kernel's ``BLOCK_M`` rows). Its virtual key range is ``lo .. n_keys`` as the kernel defines it (full rows:
  positions up to the block's last query, from the window's start; sparse rows: the pillars, then
  ``draft_start ..``);
* a unit gets ``n_c = clamp(ceil(n_keys / chunk), 1, max_chunks)`` *items*; item c of n_c covers the c-th of n_c
  equal, ``BLOCK_N``-aligned slices of the range. The kernel computes the slice from its own metadata, so the plan
  decides only how many pieces a unit gets: coverage of every key exactly once holds whatever the plan's counts.

The plan is built on the device (no host sync), once per step and sliding window, and read by every layer: this
module's tensor-op form is the reference, ``attention_plan_triton`` the one-launch form the launcher uses. Its
tensors have capacities fixed by the step's shape (``T``, ``R``), so a CUDA graph of the step captures it and any mix
of rows replays through the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionPlan:
    """``items: [W, 4]`` int32 rows ``(row, q_block, chunk, num_chunks)``, ``(-1, 0, 0, 0)`` past the real items;
    ``units: [U, 4]`` int32 rows ``(row, q_block, first_item, num_chunks)``, ``(-1, 0, 0, 0)`` past the real units
    (the plan's property tests read these; the kernel finds a unit's items from each item's own record).
    ``block_q`` is the queries per unit the plan was cut for (the kernel's ``BLOCK_Q``)."""

    items: torch.Tensor
    units: torch.Tensor
    block_q: int
    chunk: torch.Tensor  # [] int64 keys per item the plan aimed at (telemetry, tests)
    # [W, Hkv] int32 zeros: how many items of a cut unit (indexed by its first item) have written their partials,
    # per KV head; the item that brings it to num_chunks merges the unit and sets it back to 0, so every layer of
    # the step (and every CUDA-graph replay, which re-runs the plan) starts from zeros. None: the launcher makes them.
    counters: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.items.shape[0]


def item_capacity(units: int, target_items: int, max_chunks: int, forced: bool) -> int:
    """Upper bound of the items: sum n_c <= units + total / chunk, and total / chunk <= target_items when the chunk
    comes from the target, <= units / 4 when from 4x the mean; a forced chunk can give every unit max_chunks."""
    return units * max_chunks if forced else units + max(target_items, -(-units // 4))


def unit_capacity(num_tokens: int, num_rows: int, block_q: int) -> int:
    """Upper bound of sum_r ceil(q_len_r / block_q) over any split of ``num_tokens`` queries into ``num_rows``."""
    return num_tokens // block_q + num_rows


def plan_attention(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, block_q: int, *,
                   target_items: int, min_chunk: int, max_chunks: int = 64, sliding_window: int = -1,
                   is_sparse: torch.Tensor | None = None, draft_start: torch.Tensor | None = None,
                   pillar_lengths: torch.Tensor | None = None, pillar_rows: torch.Tensor | None = None,
                   max_pillars: int = 0, chunk_keys: int | None = None, compute_bound: bool = False) -> AttentionPlan:
    """Cut the step's work into about ``target_items`` items of >= ``min_chunk`` keys each (``chunk_keys`` forces
    the chunk size: tests and sweeps). ``compute_bound`` (steps with prefill chunks): once the units fill the device,
    cut only the outliers. Arguments as :func:`unified_attention`; ``num_tokens`` is ``T`` (padding
    included), which with ``R`` fixes the plan's capacities."""
    R = seq_lens.shape[0]
    dev = seq_lens.device
    i64 = torch.int64
    qsl = query_start_loc.to(i64)
    q_len = (qsl[1:] - qsl[:-1]).clamp(min=0)
    L = seq_lens.to(i64)
    nqb = torch.where(L > 0, (q_len + block_q - 1) // block_q, 0)  # padding rows (seq_len 0) have no units
    U = unit_capacity(num_tokens, R, block_q)
    ends = torch.cumsum(nqb, 0)
    u = torch.arange(U, device=dev, dtype=i64)
    urow = torch.searchsorted(ends, u, right=True)  # the row whose units span u; R: none
    valid = urow < R
    r = urow.clamp(max=R - 1)
    qb = u - (ends - nqb)[r]
    pos0 = L[r] - q_len[r]
    first_q = pos0 + qb * block_q
    last = torch.minimum(first_q + block_q, L[r]) - 1
    lo = (first_q - sliding_window + 1).clamp(min=0) if sliding_window > 0 else torch.zeros_like(first_q)
    n_keys = last + 1 - lo
    if is_sparse is not None:
        rows = pillar_rows.to(i64)[r] if pillar_rows is not None else r
        n_pil = pillar_lengths.to(i64)[rows].clamp(min=0, max=max_pillars)
        n_sparse = n_pil + (last + 1 - draft_start.to(i64)[r]).clamp(min=0)
        n_keys = torch.where(is_sparse[r], n_sparse, n_keys)
    n_keys = torch.where(valid, n_keys.clamp(min=0), 0)
    if chunk_keys is not None:
        chunk = torch.full((), int(chunk_keys), dtype=i64, device=dev)
    else:
        total, n_units = n_keys.sum(), valid.sum()
        fill = (total + target_items - 1) // target_items
        if compute_bound:  # enough prefill q-blocks already fill the device: cut only the outliers (4x the mean)
            fill = torch.where(n_units < target_items, fill, 4 * ((total + n_units - 1) // n_units.clamp(min=1)))
        chunk = fill.clamp(min=min_chunk)
    n_c = torch.where(valid, ((n_keys + chunk - 1) // chunk).clamp(min=1, max=max_chunks), 0)
    W = item_capacity(U, target_items, max_chunks, forced=chunk_keys is not None)
    iends = torch.cumsum(n_c, 0)
    w = torch.arange(W, device=dev, dtype=i64)
    iu = torch.searchsorted(iends, w, right=True)
    ivalid = iu < U
    iu = iu.clamp(max=U - 1)
    first = iends - n_c
    items = torch.stack([torch.where(ivalid, r[iu], -1), qb[iu], w - first[iu], n_c[iu]], 1)
    items = torch.where(ivalid[:, None], items, _padding_record(items))
    units = torch.stack([r, qb, first, n_c], 1)
    units = torch.where(valid[:, None], units, _padding_record(units))
    return AttentionPlan(items=items.to(torch.int32).contiguous(), units=units.to(torch.int32).contiguous(),
                         block_q=block_q, chunk=chunk)


def _padding_record(like: torch.Tensor) -> torch.Tensor:
    pad = torch.zeros_like(like[:1])  # (-1, 0, 0, 0), made on the device (no host copy: capturable)
    pad[:, 0] = -1
    return pad


def item_key_range(n_virtual: int, lo: int, chunk: int, num_chunks: int, block_n: int) -> tuple[int, int]:
    """[begin, end) of item ``chunk`` of ``num_chunks`` over the virtual keys ``lo .. n_virtual`` — the kernel's
    rule, in Python for the plan's property tests."""
    tiles = max(-(-(n_virtual - lo) // block_n), 0)
    per = -(-tiles // num_chunks) * block_n
    begin = lo + chunk * per
    return begin, min(n_virtual, begin + per)
