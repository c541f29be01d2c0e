"""Unified scheduler: explicit bookkeeping of one cycle, phase staggering, bad input, and a Hypothesis state
machine that drives it with a fake model (ss_runtime_sim) and checks nothing is lost, duplicated or leaked."""

import random
import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import event, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sparsespec_compile.runtime.block_allocator import BlockAllocator
from sparsespec_compile.runtime.request import Request, RequestState
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.scheduler import Refresh, Scheduler, StepKind
sys.path.insert(0, str(Path(__file__).parent))  # the fake model beside this file, whatever pytest's import mode
from ss_runtime_sim import EOS, V, FakeKV, reference, run_to_completion, simulate


def make(stride=3, blocks=64, page=4, budget=256, max_model_len=512, **kw):
    return Scheduler(BlockAllocator(blocks, page), stride=stride, max_num_batched_tokens=budget,
                     max_model_len=max_model_len, eos_token_ids=[EOS], **kw)


def test_one_cycle_bookkeeping():
    s = make(stride=3)
    r = Request([5, 6, 7], SamplingParams(max_tokens=100))
    s.add(r)
    p = s.schedule()
    (e,) = p.entries
    assert (e.kind, e.token_ids, e.positions, e.num_logits) == (StepKind.PREFILL, (5, 6, 7), range(0, 3), 1)
    s.update(p, [[10]])  # t0 = 10 sampled from the prompt's last logits
    assert r.output_token_ids == [10] and r.num_computed_tokens == 3 and r.state is RequestState.DRAFT
    for i, d in enumerate([11, 12, 13]):  # drafts: input the previous token, sample the next draft
        p = s.schedule()
        (e,) = p.entries
        assert (e.kind, e.token_ids, e.start_pos, e.num_logits, e.sparse) == \
            (StepKind.DRAFT, ((10, 11, 12)[i],), 3 + i, 1, False)  # first cycle: full attention
        s.update(p, [[d]])
    p = s.schedule()
    (e,) = p.entries
    # verify chunk: [last verified token, d1..dk] at consecutive positions from num_computed_tokens
    assert (e.kind, e.token_ids, e.positions, e.num_logits, e.refresh) == \
        (StepKind.VERIFY, (10, 11, 12, 13), range(3, 7), 4, Refresh.SCORE)
    assert e.draft_token_ids == (11, 12, 13) and e.seq_len == 7
    s.update(p, [[11, 20]])  # d1 accepted, d2 rejected, target says 20
    assert r.output_token_ids == [10, 11, 20] and r.num_computed_tokens == 5  # KV of 10, 11 verified
    assert r.draft_start == 3 and r.has_pillars and r.metrics.accepted == [1] and r.metrics.drafted == [3]
    assert r.metrics.mean_accepted(3) == 1.0 and r.metrics.mean_accepted(8) == 0.0
    p = s.schedule()
    (e,) = p.entries
    assert (e.kind, e.token_ids, e.start_pos, e.sparse, e.draft_start) == (StepKind.DRAFT, (20,), 5, True, 3)


def test_stride_zero_is_plain_decoding():
    s = make(stride=0)
    r = Request([1, 2], SamplingParams(max_tokens=3))
    s.add(r)
    s.update(s.schedule(), [[7]])
    for t in (8, 9):
        p = s.schedule()
        (e,) = p.entries
        assert (e.kind, e.token_ids, e.num_logits, e.refresh) == (StepKind.VERIFY, (r.last_token_id,), 1, Refresh.NONE)
        s.update(p, [[t]])
    assert r.is_finished and r.output_token_ids == [7, 8, 9] and r.finish_reason == "length"


def test_max_tokens_and_eos_mid_acceptance():
    s = make(stride=8)
    a = Request([1], SamplingParams(max_tokens=4))
    s.add(a)
    s.update(s.schedule(), [[3]])
    assert a.num_cycle_drafts == 2  # only 3 more tokens allowed: draft 2, verify emits up to 3
    s.update(s.schedule(), [[4]])
    s.update(s.schedule(), [[5]])
    p = s.schedule()
    assert p.entries[0].token_ids == (3, 4, 5)
    s.update(p, [[4, 5, 6]])
    assert a.output_token_ids == [3, 4, 5, 6] and a.finish_reason == "length" and s.allocator.num_free == 64
    b = Request([1], SamplingParams(max_tokens=50))
    s.add(b)
    p = s.schedule()
    assert p.finished == [a]  # reported once, in the next plan
    s.update(p, [[3]])
    while b.state is RequestState.DRAFT:
        s.update(s.schedule(), [[9]])
    p = s.schedule()
    s.update(p, [[9, EOS]])  # EOS accepted as the target's token: stop, later slots never appended
    assert b.output_token_ids == [3, 9, EOS] and b.finish_reason == "stop"
    assert s.schedule().finished == [b] and not s.has_unfinished()


def test_delayed_verification_sits_out_one_step():
    s = make(stride=2, delayed_verify=True)
    r = Request([1, 2], SamplingParams(max_tokens=50))
    s.add(r)
    kinds = []
    for _ in range(9):
        p = s.schedule()
        kinds.append(p.entries[0].kind.value if p.entries else "-")
        s.update(p, simulate(p, random.Random(0), 1.0, {}))
    assert kinds == ["prefill", "draft", "draft", "verify", "-", "draft", "draft", "verify", "-"]


def test_stride_zero_never_sits_out_a_step_even_with_delayed_verification():
    """Regression: plain decoding's token is final when sampled; with delayed_verify it used to stall every other
    step (2 steps per token, measured on the H200)."""
    s = make(stride=0, delayed_verify=True)
    reqs = [Request([1, 2, 3], SamplingParams(max_tokens=6)) for _ in range(3)]
    for r in reqs:
        s.add(r)
    plans = []
    while s.has_unfinished():
        plans.append(s.schedule())
        s.update(plans[-1], simulate(plans[-1], random.Random(0), 1.0, {}))
    # 1 prefill (+ t0) + 5 decode steps, then the plan that reports them finished; no empty (sit-out) step between
    assert [len(p.entries) for p in plans] == [3] * 6 + [0] and all(len(r.output_token_ids) == 6 for r in reqs)


def test_bad_requests_are_rejected_others_unaffected():
    for bad, msg in (([], "empty"), ("hi", "string"), ([1, -2], "negative"), ([1, "x"], "ints")):
        with pytest.raises(ValueError, match=msg):
            Request(bad)
    with pytest.raises(ValueError, match="SamplingParams"):
        Request([1], params={"max_tokens": 3})
    s = make(stride=2, blocks=9, page=4, max_model_len=32)
    good = Request([1, 2, 3], SamplingParams(max_tokens=5))
    too_long = Request(list(range(1, 33)))
    too_big = Request([1, 2], SamplingParams(max_tokens=200))  # accepted: generation is clipped at max_model_len
    huge = Scheduler(BlockAllocator(2, 4), stride=2, max_model_len=64)
    with pytest.raises(ValueError, match="KV pages"):
        huge.check(Request([1] * 10, SamplingParams(max_tokens=40)))
    with pytest.raises(ValueError, match="max_model_len"):
        s.check(too_long)
    assert s.add(good) and not s.add(too_long) and s.add(too_big)
    assert too_long.is_finished and too_long.finish_reason.startswith("error: prompt has 32 tokens")
    with pytest.raises(ValueError, match="duplicate"):
        s.check(good)
    fin = run_to_completion(s, random.Random(0), 0.5, {})
    assert fin[0] is too_long and good.finish_reason == "length" and len(good.output_token_ids) == 5
    assert too_big.finish_reason == "length" and too_big.num_tokens == 32  # clipped at max_model_len


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 8), n=st.integers(1, 40), seed=st.integers(0, 2**16), delayed=st.booleans())
def test_staggered_phases_keep_step_sizes_flat(k, n, seed, delayed):
    """Steady state (all decoding, no departures): every step carries n + k*v tokens with v verifying requests,
    v in {floor(n/(k+1)), ceil(n/(k+1))} — about n(2k+1)/(k+1), versus swinging between n and n(k+1).
    With delayed verification the cycle is C = k+2 steps and the s requests that verified last step sit out:
    n - s + k*v tokens, v and s in {floor(n/C), ceil(n/C)}."""
    rng = random.Random(seed)
    s = make(stride=k, blocks=4096, page=16, budget=100_000, max_model_len=100_000, delayed_verify=delayed)
    pending = [Request([rng.randrange(1, V) for _ in range(rng.randint(1, 30))],
                       SamplingParams(max_tokens=10_000)) for _ in range(n)]
    sizes = []
    for step in range(6 * (k + 2) + 4 * n):
        if pending and rng.random() < 0.5:  # arrivals spread over time, at arbitrary phases
            s.add(pending.pop())
        p = s.schedule()
        # steady state: everyone past its (phase-aligning, possibly shorter) first cycle, no prefill in the step
        if len(s.running) == n and all(r.is_decoding and r.metrics.drafted for r in s.running):
            sizes.append(p.num_tokens)
        s.update(p, simulate(p, rng, 0.6, {}))
    assert len(sizes) >= k + 1
    c = k + 1 + delayed
    lo = n - delayed * -(-n // c) + k * (n // c)
    hi = n - delayed * (n // c) + k * -(-n // c)
    assert lo <= min(sizes) and max(sizes) <= hi, (sizes, lo, hi)


class MixedStrides:
    """A stride policy drawing each request's j per cycle at random (0..j_max), sometimes offering a few for the
    planner's phase balancing: mixed strides in one batch, plain decodes among them."""

    adaptive = True

    def __init__(self, stride: int, rng: random.Random) -> None:
        self.stride, self.rng = stride, rng

    def options(self, r, j_max, num_decoding):
        return self.rng.sample(range(j_max + 1), self.rng.randint(1, j_max + 1))

    def refresh_after(self, r, j):
        return j > 0 or self.rng.random() < 0.3

    def record(self, r, drafted, accepted):
        r.acceptance.record(drafted, accepted)


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, aborts and tiny page pools (forcing offloads to a host pool — none, small: recompute
    fallbacks, or ample: never a recompute — and preemptions), a fixed stride or mixed per-request strides; a fake
    model answers every step and a fake KV pool (ss_runtime_sim.FakeKV) checks every step reads exactly the KV and
    pillars it wrote, across swaps."""

    @initialize(stride=st.integers(0, 5), page=st.integers(1, 6), blocks=st.integers(10, 40),
                budget=st.integers(6, 48), delayed=st.booleans(), accept=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
                seed=st.integers(0, 2**16), initial=st.integers(1, 8),
                host=st.sampled_from(["none", "small", "ample"]), small=st.integers(1, 12), mixed=st.booleans())
    def init(self, stride, page, blocks, budget, delayed, accept, seed, initial, host, small, mixed):
        self.max_model_len = 48
        self.host_kind = host
        num_host = {"none": 0, "small": small, "ample": 6 * blocks}[host]  # ample: 6 requests' whole pools
        policy = MixedStrides(stride, random.Random(seed + 1)) if mixed else None
        event(f"mixed strides: {mixed}")
        self.s = Scheduler(BlockAllocator(blocks, page), stride=stride, max_num_seqs=6,
                           max_num_batched_tokens=max(budget, stride + 1), max_model_len=self.max_model_len,
                           eos_token_ids=[EOS], delayed_verify=delayed, num_host_blocks=num_host, policy=policy)
        self.kv = FakeKV(page)
        self.swapped_aborts = 0
        self.verified_last: set = set()
        self.rng, self.accept = random.Random(seed), accept
        self.truth, self.expect, self.eos_at, self.reqs, self.aborted = {}, {}, {}, [], set()
        self.finished: list[Request] = []
        for _ in range(initial):  # a busy start, so preemption and staggering get exercised
            self.add(self.rng.randint(1, 20), self.rng.randint(1, 40), self.rng.randint(0, 60), [], False)

    @rule(plen=st.integers(1, 20), max_tokens=st.integers(1, 40), eos_after=st.integers(0, 60),
          stop=st.lists(st.integers(1, V - 1), max_size=2), ignore_eos=st.booleans())
    def add(self, plen, max_tokens, eos_after, stop, ignore_eos):
        r = Request([self.rng.randrange(1, V) for _ in range(plen)],  # explicit id: replayable by Hypothesis
                    SamplingParams(max_tokens=max_tokens, stop_token_ids=stop, ignore_eos=ignore_eos),
                    request_id=len(self.reqs))
        self.eos_at[r.request_id] = plen + eos_after
        out, why = reference(r, {EOS}, self.max_model_len, self.eos_at)
        self.truth[r.request_id], self.expect[r.request_id] = r.prompt_token_ids + out, (out, why)
        try:
            self.s.check(r)
            ok = True
        except ValueError:
            ok = False
        assert self.s.add(r) == ok
        if not ok:
            self.expect[r.request_id] = (None, "error")
        self.reqs.append(r)

    @rule(steps=st.integers(1, 6))
    def step(self, steps):
        for _ in range(steps):
            plan = self.schedule()
            self.check_plan(plan)
            self.s.update(plan, simulate(plan, self.rng, self.accept, self.eos_at, self.truth))

    def schedule(self):
        admitted_before = max((r.admit_order for r in self.reqs), default=-1)
        plan = self.s.schedule()
        if self.s.swapped:  # swapped requests come back before anyone new is admitted
            assert all(r.admit_order <= admitted_before for r in self.s.running)
        return plan

    @precondition(lambda self: self.s.running or self.s.waiting or self.s.swapped)
    @rule(data=st.data())
    def abort(self, data):
        r = data.draw(st.sampled_from(self.s.running + self.s.swapped + list(self.s.waiting)))
        self.swapped_aborts += r.state is RequestState.SWAPPED
        self.s.abort(r, "error: injected")
        self.aborted.add(r.request_id)

    def check_plan(self, plan):
        self.finished += plan.finished
        ids = {e.request.request_id for e in plan.entries}
        # a request that verified at step i sits out step i+1 (delayed verification; a plain decode does not)
        assert not ids & self.verified_last, (plan.step, ids & self.verified_last)
        self.verified_last = {e.request.request_id for e in plan.entries if e.kind is StepKind.VERIFY
                              and self.s.planner.sits_out_after_verify(e.num_tokens - 1)}
        for op in plan.swap_in + plan.swap_out:
            r = op.request
            assert len(op.device_blocks) == len(op.host_blocks) and r not in plan.preempted
        for op in plan.swap_in:
            assert op.request in self.s.running and list(op.device_blocks) == op.request.block_table[:len(op.device_blocks)]
        for op in plan.swap_out:
            assert op.request.state is RequestState.SWAPPED or op.request in self.s.running or op.request.is_finished
        self.kv.apply(plan)
        self.kv.run(plan)
        assert plan.num_tokens <= self.s.max_num_batched_tokens
        ids = [e.request.request_id for e in plan.entries]
        assert len(ids) == len(set(ids))  # at most one entry per request per step
        for e in plan.entries:
            r = e.request
            assert r in self.s.running and r not in plan.preempted
            assert len(r.block_table) * self.s.allocator.page_size >= e.seq_len  # pages cover every write
            assert e.seq_len <= self.max_model_len
            if e.kind is StepKind.PREFILL:  # contiguous from the first uncached position
                assert e.start_pos == r.num_computed_tokens and e.seq_len <= r.prefill_target
            elif e.kind is StepKind.DRAFT:
                assert e.start_pos == r.num_computed_tokens + len(r.draft_token_ids) == r.num_tokens - 1 + len(r.draft_token_ids)
            else:
                assert e.start_pos == r.num_computed_tokens == r.num_tokens - 1
                assert e.token_ids == (r.last_token_id, *r.draft_token_ids)
                assert (e.refresh is Refresh.SCORE) == r.cycle_refresh and e.num_logits == e.num_tokens <= self.s.stride + 1
                if not self.s.planner.policy.adaptive:  # a fixed stride refreshes at every verify
                    assert r.cycle_refresh == (self.s.stride > 0)
            # sparse drafts only once pillars exist; their dense tail starts at the last verify chunk
            assert not e.sparse or (e.kind is StepKind.DRAFT and r.has_pillars and e.draft_start < e.start_pos)

    @invariant()
    def pages_and_slots_conserved(self):
        if not hasattr(self, "s"):
            return
        a, h, s = self.s.allocator, self.s.host, self.s
        held = [b for r in s.running for b in r.block_table]
        assert len(held) == len(set(held)) and a.num_free + len(held) == a.num_blocks
        assert all(not r.block_table and r.pillar_slot == -1 for r in self.reqs if r not in s.running)
        slots = [r.pillar_slot for r in s.running]
        assert len(set(slots)) == len(slots) and all(0 <= x < s.max_num_seqs for x in slots)
        # host pages and host pillar rows: held by swapped requests only, each once, the rest free
        assert len(s.running) + len(s.swapped) <= s.max_num_seqs
        assert all(r.state is RequestState.SWAPPED for r in s.swapped) and not set(s.swapped) & set(s.running)
        assert all(not r.host_blocks and r.host_row == -1 for r in self.reqs if r not in s.swapped)
        hosted = [b for r in s.swapped for b in r.host_blocks]
        rows = [r.host_row for r in s.swapped]
        assert len(hosted) == len(set(hosted)) and len(rows) == len(set(rows))
        assert s.kv.num_free_host_rows + len(rows) == s.max_num_seqs
        if h is None:
            assert not s.swapped and s.num_swap_outs == 0
        else:
            assert h.num_free + len(hosted) == h.num_blocks
        if self.host_kind == "ample":
            assert s.num_recomputes == 0  # the host pool always had room: nothing was recomputed
        for r in self.s.running:
            if r.is_decoding:
                assert r.num_computed_tokens == r.num_tokens - 1

    def teardown(self):
        if not hasattr(self, "s"):
            return
        run_to_completion(self.s, self.rng, self.accept, self.eos_at, self.truth, max_steps=20_000,
                          on_plan=self.check_plan)
        self.pages_and_slots_conserved()
        event(f"preempted: {sum(r.metrics.num_preemptions for r in self.reqs) > 0}")
        event(f"offloaded ({self.host_kind} host pool): {self.s.num_swap_outs > 0}")
        assert self.s.num_swap_ins + self.swapped_aborts == self.s.num_swap_outs and not self.s.swapped
        assert self.s.host is None or self.s.host.num_free == self.s.host.num_blocks
        assert sum(r.metrics.num_offloads for r in self.reqs) == self.s.num_swap_outs
        assert sum(r.metrics.num_preemptions for r in self.reqs) == self.s.num_recomputes
        event(f"requests: {min(len(self.reqs), 8)}+")
        ids = [r.request_id for r in self.finished]
        assert sorted(ids) == sorted(r.request_id for r in self.reqs)  # each reported finished exactly once
        assert self.s.allocator.num_free == self.s.allocator.num_blocks
        for r in self.reqs:  # every request finished, with exactly plain greedy decoding's output
            assert r.is_finished, r
            out, why = self.expect[r.request_id]
            if r.request_id in self.aborted and r.finish_reason == "error: injected":
                assert r.output_token_ids == out[:len(r.output_token_ids)]
            elif why == "error":
                assert r.finish_reason.startswith("error:")
            else:
                assert (r.output_token_ids, r.finish_reason) == (out, why)


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=250, stateful_step_count=25, deadline=None)


def test_malformed_results_fail_only_their_request_and_logits_indices():
    s = make(stride=2)
    a, b = Request([1, 2, 3], SamplingParams(max_tokens=20)), Request([4, 5], SamplingParams(max_tokens=20))
    s.add(a), s.add(b)
    p = s.schedule()
    assert p.logits_indices() == [2, 4]  # last token of each prompt, flattened back to back
    s.update(p, [[7], [8]])
    while a.state is not RequestState.VERIFY:
        p = s.schedule()
        s.update(p, [[9]] * len(p.entries))
    p = s.schedule()
    ea, eb = p.entries
    assert ea.kind is StepKind.VERIFY and p.logits_indices() == list(range(p.num_tokens))
    # a's result contradicts its drafts (an engine bug): a fails alone; b's result (with -1 padding) applies
    s.update(p, [[5, 5, 5], [9, 9, 3, -1][:eb.num_tokens] if eb.kind is StepKind.VERIFY else [9]])
    assert a.is_finished and a.finish_reason.startswith("error: verify result") and not a.block_table
    assert not b.is_finished
    fin = run_to_completion(s, random.Random(0), 0.5, {})
    assert a in fin and b.finish_reason == "length"


def test_held_requests_sit_out_until_released_then_resume():
    """Overlap: a verify whose result is still on the device is held — never scheduled, however many steps pass —
    and after release + update it sits out as delayed verification does, then starts its next cycle."""
    s = make(stride=2, delayed_verify=True)
    r = Request([1, 2], SamplingParams(max_tokens=50))
    s.add(r)
    rng = random.Random(0)
    while True:
        p = s.schedule()
        if p.entries and p.entries[0].kind is StepKind.VERIFY:
            break
        s.update(p, simulate(p, rng, 1.0, {}))
    verify_plan = p
    s.hold(r)
    assert r.state is RequestState.STALL
    assert not any(s.schedule().entries for _ in range(3))  # held: sits out every step until released
    s.release(r)
    s.update(verify_plan, simulate(verify_plan, rng, 1.0, {}))
    kinds = [e.kind for e in s.schedule().entries]
    assert kinds == [StepKind.DRAFT] and r.metrics.accepted == [2]
