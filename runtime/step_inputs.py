"""Plan → tensors: the flattened ragged batch and the ForwardContext of one step (built once, read by every layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.context import ForwardContext, PagedKVCache, PillarStore

from .host_copy import to_device
from .step_plan import Refresh, StepPlan


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    logits_indices: torch.Tensor  # [N] int64: rows of the flattened batch whose logits are sampled
    ctx: ForwardContext


def build_step_inputs(
    plan: StepPlan,
    kv: PagedKVCache,
    pillars: PillarStore | None,
    config: SparseSpecConfig,
    sliding_windows: list[int],
    impl: str,
    device: torch.device,
) -> StepInputs:
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens, is_sparse, draft_start, pillar_slot = [], [], [], []
    score_rows, budget = [], []
    page = kv.page_size
    width = max(len(e.request.block_table) for e in plan.entries)
    tables = []
    for i, e in enumerate(plan.entries):
        bt = e.request.block_table
        ids += e.token_ids
        pos += e.positions
        slots += [bt[p // page] * page + p % page for p in e.positions]
        qsl.append(len(ids))
        seq_lens.append(e.seq_len)
        tables.append(bt + [0] * (width - len(bt)))
        is_sparse.append(e.sparse)
        draft_start.append(e.draft_start)
        pillar_slot.append(e.request.pillar_slot)
        if e.refresh is Refresh.SCORE:
            score_rows.append(i)
            budget.append(config.budget(e.start_pos))

    # Dynamo specializes sizes 0 and 1 even on dims marked dynamic: a one-token step (the last request decoding
    # alone) or a one-logit step would recompile the whole model (~40 s with Inductor for SmolLM2 on the H200).
    # Pad to two: the extra token belongs to no request (past query_start_loc[R], slot -1), the extra logit rows
    # repeat the last one (or token 0); the engine reads only the plan's rows.
    if len(ids) == 1:
        ids, pos, slots = ids + [0], pos + [0], slots + [-1]
    logits_indices = plan.logits_indices()
    if len(logits_indices) < 2:  # (none: a step of non-final prefill chunks)
        logits_indices = (logits_indices or [0]) * 2

    def t(x, dtype):
        return to_device(x, device, dtype)

    ctx = ForwardContext(
        kv=kv,
        slot_mapping=t(slots, torch.int64),
        query_start_loc=t(qsl, torch.int32),
        seq_lens=t(seq_lens, torch.int32),
        block_tables=t(tables, torch.int32),
        max_query_len=max(e.num_tokens for e in plan.entries),
        max_seq_len=max(seq_lens),
        is_sparse=t(is_sparse, torch.bool),
        draft_start=t(draft_start, torch.int32),
        pillar_slot=t(pillar_slot, torch.int64),
        pillars=pillars,
        score_rows=t(score_rows, torch.int64) if score_rows else None,
        budget=t(budget, torch.int32) if budget else None,
        recent=config.recent,
        sliding_windows=sliding_windows,
        impl=impl,
    )
    return StepInputs(
        input_ids=t([ids], torch.int64),
        position_ids=t([pos], torch.int64),
        logits_indices=t(logits_indices, torch.int64),
        ctx=ctx,
    )


def write_streaming_pillars(pillars: PillarStore, slots: list[int], context_lens: list[int], budgets: list[int],
                            sinks: int = 4) -> None:
    """MagicDec-style fixed draft sets at the same budget, for every request of a step at once: row ``slots[i]``
    gets the ``sinks`` first tokens + the newest ``budget - sinks`` of its ``context_lens[i]`` (0 beyond its length).

    One small copy and three launches per step, built on the device: it was a Python list, a pinned copy and two
    writes per verifying request. Before that, a blocking ``torch.tensor(idx, device=cuda)`` per request. That took
    the H200 streaming step from 3.37 to 2.26 ms, but the run still idled 16 % (bench/RESULTS.md, fourth session).
    """
    if not slots:
        return
    b = [min(bud, n) for bud, n in zip(budgets, context_lens)]
    slot_t, ctx_t, b_t = to_device([slots, context_lens, b], pillars.indices.device)  # [3, R] int64
    j = torch.arange(max(b), device=slot_t.device)
    s_t = b_t.clamp(max=sinks)[:, None]
    idx = torch.where(j < s_t, j, ctx_t[:, None] - b_t[:, None] + j)
    idx = torch.where(j < b_t[:, None], idx, 0).to(torch.int32)  # [R, W]
    pillars.indices[:, slot_t, :, : idx.shape[1]] = idx[None, :, None, :]
    pillars.lengths[slot_t] = b_t.to(pillars.lengths.dtype)
