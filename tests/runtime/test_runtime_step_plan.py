"""A StepPlan is sealed by the scheduler once complete: its entries are fixed from then on, and the aggregates
(``num_tokens``, ``token_offsets``, ``logits_indices``) exist only from then on, so they always describe its entries."""

from __future__ import annotations

import dataclasses

import pytest

from sparsespec_compile.runtime.block_allocator import BlockAllocator
from sparsespec_compile.runtime.request import Request
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.scheduler import Scheduler
from sparsespec_compile.runtime.step_plan import StepEntry, StepKind, StepPlan


def _entry(n: int, logits: int) -> StepEntry:
    return StepEntry(Request([1, 2, 3], SamplingParams(max_tokens=4)), StepKind.PREFILL, tuple(range(n)), 0, logits)


def test_aggregates_are_computed_at_seal_and_not_before():
    plan = StepPlan(3, [_entry(3, 1)])
    plan.entries.append(_entry(2, 0))  # building: entries grow
    for read in (lambda: plan.num_tokens, plan.token_offsets, plan.logits_indices):
        with pytest.raises(RuntimeError, match="before seal"):
            read()
    assert plan.seal() is plan and plan.sealed
    assert (plan.num_tokens, plan.token_offsets(), plan.logits_indices()) == (5, [0, 3], [2])


def test_a_sealed_plan_cannot_change_its_entries():
    plan = StepPlan(0, [_entry(2, 1)]).seal()
    with pytest.raises(AttributeError):
        plan.entries.append(_entry(1, 1))
    with pytest.raises(TypeError):
        plan.entries[0] = _entry(4, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.entries = [_entry(4, 1)]
    with pytest.raises(RuntimeError, match="sealed already"):
        plan.seal()
    assert plan.num_tokens == 2


def test_the_scheduler_hands_over_sealed_plans():
    s = Scheduler(BlockAllocator(32, 4), stride=2, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)
    s.add(Request([1, 2, 3, 4, 5], SamplingParams(max_tokens=4)))
    s.add(Request([6, 7], SamplingParams(max_tokens=4)))
    plan = s.schedule()
    assert plan.sealed and isinstance(plan.entries, tuple)
    assert plan.num_tokens == 7 and plan.token_offsets() == [0, 5] and plan.logits_indices() == [4, 6]
    empty = Scheduler(BlockAllocator(8, 4), stride=2, max_num_seqs=4, max_num_batched_tokens=16,
                      max_model_len=64).schedule()
    assert empty.sealed and empty.num_tokens == 0
