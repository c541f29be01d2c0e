"""Offload (the dynamic KV cache) at the scheduler level, torch-free: a page pool just above one request's need,
many requests, a fake model and a fake KV pool that checks every step reads exactly the KV it wrote across swaps."""

import random
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from sparsespec_compile.runtime.block_allocator import BlockAllocator
from sparsespec_compile.runtime.request import Request, RequestState
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.scheduler import Scheduler, StepKind

sys.path.insert(0, str(Path(__file__).parent))
from ss_runtime_sim import EOS, V, FakeKV, reference, run_to_completion  # noqa: E402

MAX_LEN = 64


def _requests(rng, n, plen_max, max_tokens):
    return [Request([rng.randrange(1, V) for _ in range(rng.randint(1, plen_max))],
                    SamplingParams(max_tokens=max_tokens, ignore_eos=True), request_id=i) for i in range(n)]


def _run(reqs, *, stride, page, blocks, host, delayed=False, accept=0.7, seed=0, watch=None, **kw):
    s = Scheduler(BlockAllocator(blocks, page), stride=stride, max_num_seqs=8, max_num_batched_tokens=64,
                  max_model_len=MAX_LEN, eos_token_ids=[EOS], delayed_verify=delayed, num_host_blocks=host, **kw)
    truth, expect = {}, {}
    for r in reqs:
        out, why = reference(r, {EOS}, MAX_LEN, {})
        truth[r.request_id], expect[r.request_id] = r.prompt_token_ids + out, (out, why)
        assert s.add(r)
    kv, plans = FakeKV(page), []

    def on_plan(plan):
        kv.apply(plan)
        if watch is not None:
            watch(plan)
        kv.run(plan)
        plans.append(plan)
        held = [b for r in s.swapped for b in r.host_blocks]
        assert s.host is None or s.host.num_free + len(held) == s.host.num_blocks
        assert s.allocator.num_free + sum(len(r.block_table) for r in s.running) == blocks

    run_to_completion(s, random.Random(seed), accept, {}, truth, on_plan=on_plan)
    for r in reqs:
        assert (r.output_token_ids, r.finish_reason) == expect[r.request_id]
    assert s.allocator.num_free == blocks and (s.host is None or s.host.num_free == s.host.num_blocks)
    return s, plans


@settings(max_examples=40, deadline=None)
@given(stride=st.integers(0, 6), page=st.sampled_from([1, 2, 4]), n=st.integers(2, 8), delayed=st.booleans(),
       host=st.sampled_from(["small", "ample"]), seed=st.integers(0, 2**16))
def test_tiny_pool_every_request_finishes_with_reference_output(stride, page, n, delayed, host, seed):
    rng = random.Random(seed)
    reqs = _requests(rng, n, 12, 24)
    worst = max(-(-(r.num_prompt_tokens + 24 + stride) // page) for r in reqs)
    blocks = worst + 1  # just above one request's need: the others must be offloaded or wait
    host_blocks = {"small": max(1, worst // 2), "ample": n * worst}[host]
    s, plans = _run(reqs, stride=stride, page=page, blocks=blocks, host=host_blocks, delayed=delayed, seed=seed)
    assert s.num_swap_ins == s.num_swap_outs
    if host == "ample":
        assert s.num_recomputes == 0 and all(r.metrics.offload_fallbacks == 0 for r in reqs)
    assert sum(r.metrics.num_offloads for r in reqs) == s.num_swap_outs
    assert sum(r.metrics.num_preemptions for r in reqs) == s.num_recomputes


def test_offload_keeps_the_interrupted_cycle_and_restores_first():
    """Requests in a pool that holds about one: the younger ones are offloaded mid-cycle, come back with their drafts
    (the next draft step continues the cycle: no prefill, no restart) and before anyone new is admitted."""
    reqs = _requests(random.Random(1), 4, 8, 30)
    at_swap, resumed = {}, []

    def watch(plan):
        for op in plan.swap_in:
            r = op.request
            state, drafts, n = at_swap.pop(r.request_id)
            assert (r.state, r.draft_token_ids, r.num_computed_tokens) == (state, drafts, n)
            e = next((e for e in plan.entries if e.request is r), None)
            if e is not None and state is RequestState.DRAFT:
                assert e.kind is StepKind.DRAFT and e.start_pos == n + len(drafts)
                resumed.append(len(drafts))
        for op in plan.swap_out:
            r = op.request
            at_swap[r.request_id] = (r.swapped_state, list(r.draft_token_ids), r.num_computed_tokens)

    s, plans = _run(reqs, stride=4, page=2, blocks=26, host=64, watch=watch)
    assert s.num_swap_outs > 0 and s.num_recomputes == 0 and any(m > 0 for m in resumed)
    for r in reqs:  # nothing recomputed: each prompt prefilled exactly once
        prefills = [e for p in plans for e in p.entries if e.request is r and e.kind is StepKind.PREFILL]
        assert sum(e.num_tokens for e in prefills) == r.num_prompt_tokens


def test_full_host_pool_falls_back_to_recompute(caplog):
    rng = random.Random(2)
    reqs = _requests(rng, 4, 8, 30)
    with caplog.at_level("WARNING", logger="sparsespec.runtime"):
        s, _ = _run(reqs, stride=3, page=2, blocks=24, host=1)
    assert s.num_recomputes > 0 and sum(r.metrics.offload_fallbacks for r in reqs) == s.num_recomputes
    assert "host KV pool full" in caplog.text


def test_oversubscription_cap_admits_within_guaranteed_capacity():
    rng = random.Random(3)
    reqs = _requests(rng, 6, 8, 30)
    s, _ = _run(reqs, stride=3, page=2, blocks=60, host=64, max_oversubscription=1.0)
    assert s.num_swap_outs == 0 and s.num_recomputes == 0  # worst cases always fit: never any pressure
    reqs = _requests(random.Random(3), 6, 8, 30)
    s, _ = _run(reqs, stride=3, page=2, blocks=60, host=64)
    assert s.num_swap_outs > 0  # aggressive admission oversubscribes and offloads
    with pytest.raises(ValueError, match="max_oversubscription"):
        Scheduler(BlockAllocator(4, 2), max_oversubscription=0.0)


def test_abort_while_swapped_frees_host_pages():
    s = Scheduler(BlockAllocator(8, 2), stride=2, max_num_batched_tokens=64, max_model_len=MAX_LEN,
                  num_host_blocks=8)
    a, b = Request([1, 2, 3], SamplingParams(max_tokens=8)), Request([4, 5, 6], SamplingParams(max_tokens=8))
    s.add(a), s.add(b)
    while b.state is not RequestState.SWAPPED:
        p = s.schedule()
        assert not p.preempted
        s.update(p, [[7] if e.kind is not StepKind.VERIFY else list(e.draft_token_ids) + [7] for e in p.entries])
    assert b.host_blocks and s.host.num_free < 8
    s.abort(b)
    assert s.host.num_free == 8 and not s.swapped and not b.host_blocks and b.finish_reason == "abort"
