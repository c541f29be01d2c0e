"""The adaptive stride's pieces on their own: decayed acceptance, the step-cost fit, the per-request choice; then in
the scheduler: a request whose drafts never match falls to plain decoding while the others keep speculating."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from sparsespec_compile.runtime.acceptance import AcceptanceStats, expected_tokens, per_position
from sparsespec_compile.runtime.block_allocator import BlockAllocator
from sparsespec_compile.runtime.request import Request
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.scheduler import Scheduler, StepKind
from sparsespec_compile.runtime.step_cost import FixedStepCost, StepCostModel, StepWork
from sparsespec_compile.runtime.stride_policy import PROBE_DRAFTS, PROBE_FIRST, AdaptiveStride

sys.path.insert(0, str(Path(__file__).parent))
from ss_runtime_sim import EOS, V, reference, simulate  # noqa: E402

KV_BOUND = FixedStepCost(0.0, 0.0, 1.0, 0.1)  # keys dominate, sparse keys 10x cheaper: speculation pays if accepted
LAUNCH_BOUND = FixedStepCost(1.0, 0.001, 0.0, 0.0)  # a fixed cost per step: only tokens per step matter


def test_acceptance_is_conditional_decayed_and_smoothed():
    a = AcceptanceStats(decay=0.5)
    a.record(4, 2)  # drafts 1, 2 accepted, 3 judged and rejected, 4 never judged
    assert a.judged == [1, 1, 1, 0] and a.accepted == [1, 1, 0, 0]
    assert a.conditional(4, [0.5] * 4, prior_weight=1.0) == [0.75, 0.75, 0.25, 0.5]
    assert a.conditional(1, [0.5], prior_weight=0.5)[0] == pytest.approx(1.25 / 1.5)
    a.record(2, 0)
    assert a.judged == [1.5, 0.5, 0.5, 0] and a.accepted == [0.5, 0.5, 0, 0]
    assert expected_tokens([1.0, 0.5, 0.5], 3) == 1 + 1 + 0.5 + 0.25
    assert per_position([2, 0, 3], [4, 2, 3], 4) == [2 / 3, 2 / 3, 1 / 2, 0.0]
    with pytest.raises(ValueError):
        a.record(2, 3)


def test_step_cost_fit_recovers_the_coefficients_and_keeps_the_seed_where_unmeasured():
    true = (2e-3, 3e-7, 2e-11, 0.0)
    m = StepCostModel(seed=(1e-3, 1e-6, 1e-10, 7e-11), forget=0.99)
    rng = random.Random(0)
    for _ in range(200):  # no sparse rows: that coefficient is never excited
        w = StepWork(tokens=rng.randint(1, 300), full_keys=rng.randint(1000, 10 ** 6))
        m.observe(w, true[0] + true[1] * w.tokens + true[2] * w.full_keys)
    # close: the ridge pulls towards the seed (half / 3x / 5x the truth here), most where the data say least —
    # keys are ~1% of these steps' time
    c = m.coefficients()
    assert c[0] == pytest.approx(true[0], rel=0.01) and c[1] == pytest.approx(true[1], rel=0.1)
    assert c[2] == pytest.approx(true[2], rel=0.3) and c[3] == pytest.approx(7e-11)
    m.observe(StepWork(tokens=1), 0.0)  # no measurement: ignored
    assert m.observed == 200


def _decoding(ctx=2000, max_tokens=1000, pillars=True):
    r = Request(list(range(1, 4)), SamplingParams(max_tokens=max_tokens))
    r.num_computed_tokens, r.has_pillars, r.output_token_ids = ctx, pillars, [1]
    return r


def test_choice_follows_acceptance_and_cost():
    policy = AdaptiveStride(8, KV_BOUND, lambda ctx: max(16, ctx // 20))
    good, bad = _decoding(), _decoding()
    for _ in range(8):
        good.acceptance.record(8, 8)
        bad.acceptance.record(8, 0)
    assert policy.options(good, 8, num_decoding=64)[0] == 8  # long context, cheap sparse drafts, all accepted
    assert policy.options(bad, 8, num_decoding=64) == [0]
    s = policy.scores(good, 8, 64)
    assert s[8] > 3 * s[0]
    # launch-bound (every step costs the same, whatever it holds): k drafts + a verify take k+1 steps for at most
    # k+1 tokens, so plain decoding wins even when every draft is accepted
    for batch in (1, 256):
        assert AdaptiveStride(8, LAUNCH_BOUND, lambda c: 16).options(good, 8, batch) == [0]
    assert AdaptiveStride(8, KV_BOUND, lambda c: 16).options(_decoding(pillars=False), 8, 64)[0] == 0  # no pillars:
    # its drafts would be full-attention rows, as dear as plain decodes


def test_verify_passes_are_priced():
    """A verify row reads its context once per q-block (kernels.query_passes): with a 4-query block and every draft
    accepted, 3 drafts (4 queries, one pass) beat 4 (5 queries, two passes) when keys dominate the cost."""
    from sparsespec_compile import kernels

    assert [kernels.query_passes(9, 3, n) for n in (1, 5, 6, 9)] == [1, 1, 2, 2]  # SmolLM2: 5 queries a block
    assert [kernels.query_passes(32, 8, n) for n in (1, 4, 5, 9)] == [1, 1, 2, 3]  # Qwen3-8B: 4 queries a block
    assert kernels.query_passes(32, 8, 9, impl="reference") == 1
    passes = lambda n: -(-n // 4)  # noqa: E731
    good = _decoding(ctx=8000)
    for _ in range(8):
        good.acceptance.record(4, 4)
    keys = FixedStepCost(0.0, 0.0, 1.0, 0.01)
    assert AdaptiveStride(4, keys, lambda c: 64, passes=passes).options(good, 4, 64)[0] == 3
    assert AdaptiveStride(4, keys, lambda c: 64).options(good, 4, 64)[0] == 4  # one pass whatever the count
    w = StepWork(tokens=9, full_keys=3 * 1000)  # what step_work counts for a 9-token verify row at context 1000
    from sparsespec_compile.runtime.step_cost import step_work
    from sparsespec_compile.runtime.step_plan import StepEntry, StepPlan

    r = _decoding(ctx=991)
    plan = StepPlan(step=0, entries=[StepEntry(r, StepKind.VERIFY, tuple(range(9)), 991, 9)])
    assert step_work(plan, lambda c: 64, passes).full_keys == w.full_keys


def test_plain_decoding_request_probes_with_backoff():
    policy = AdaptiveStride(8, KV_BOUND, lambda ctx: 16)
    r = _decoding()
    for _ in range(4):
        r.acceptance.record(8, 0)
    chosen, refresh = [], []
    for _ in range(3 * PROBE_FIRST + 3):
        j = policy.options(r, 8, 8)[0]
        chosen.append(j)
        refresh.append(policy.refresh_after(r, j))
        if j:
            r.acceptance.record(j, 0)  # the probe fails
    probes = [i for i, j in enumerate(chosen) if j]
    assert [chosen[i] for i in probes] == [PROBE_DRAFTS] * len(probes)
    assert probes == [PROBE_FIRST, PROBE_FIRST + 2 * PROBE_FIRST + 1]  # the interval doubles after a failure
    # pillars are refreshed by a speculative cycle's verify and by the plain decode just before a probe only
    assert [i for i, f in enumerate(refresh) if f] == sorted(probes + [p - 1 for p in probes])


def test_plain_request_is_repriced_every_few_cycles_not_every_step():
    """Between probes a plain-decoding request's acceptance cannot change, so it is priced once per RECHECK cycles
    (at B 256 pricing every request every step cost ~11 ms of host time a step)."""
    from sparsespec_compile.runtime.stride_policy import RECHECK

    policy = AdaptiveStride(8, KV_BOUND, lambda ctx: 16)
    calls = [0]  # requests priced
    real = policy._price

    def counted(reqs, *a):
        calls[0] += len(reqs)
        return real(reqs, *a)

    policy._price = counted
    r = _decoding()
    for _ in range(4):
        r.acceptance.record(8, 0)
    chosen = [policy.options(r, 8, 8)[0] for _ in range(PROBE_FIRST)]
    assert chosen == [0] * PROBE_FIRST  # the same choices as pricing every cycle (the probe test checks the rest)
    assert 0 < calls[0] <= PROBE_FIRST // RECHECK + 2


def _run(sched, bad_ids, truth, eos_at, max_steps=5000):
    """Accept every draft except those of ``bad_ids``, whose drafts are always wrong (a planted bad draft)."""
    rng = random.Random(0)
    plans = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return plans
        plan = sched.schedule()
        res = simulate(plan, rng, 1.0, eos_at, truth)
        for i, e in enumerate(plan.entries):
            if e.kind is StepKind.DRAFT and e.request.request_id in bad_ids:
                res[i] = [res[i][0] % (V - 1) + 1]  # never the target's token
        sched.update(plan, res)
        plans.append(plan)
    raise AssertionError("not finished")


@pytest.mark.parametrize("delayed", [False, True])
def test_a_request_whose_drafts_never_match_falls_to_plain_decoding(delayed):
    policy = AdaptiveStride(4, KV_BOUND, lambda ctx: min(4, ctx), delayed_verify=delayed)
    s = Scheduler(BlockAllocator(512, 4), stride=4, max_num_batched_tokens=64, max_model_len=400,
                  eos_token_ids=[EOS], delayed_verify=delayed, policy=policy)
    reqs = [Request(list(range(1 + i, 40 + i)), SamplingParams(max_tokens=120), request_id=i) for i in range(3)]
    truth, eos_at = {}, {}
    for r in reqs:
        s.add(r)
        truth[r.request_id] = r.prompt_token_ids + reference(r, {EOS}, 400, eos_at)[0]
    _run(s, {0}, truth, eos_at)
    bad, good = reqs[0].metrics.drafted, [r.metrics.drafted for r in reqs[1:]]
    # One failed cycle is not enough to give up (the estimate is smoothed towards the population's, which accepts
    # everything here); three are: from then on it decodes plainly and only probes, 2 drafts at a time, backing off.
    failed = [i for i, j in enumerate(bad) if j > PROBE_DRAFTS]
    assert len(failed) <= 3 and failed[-1] <= 12, bad
    after = bad[failed[-1] + 1:]
    assert len(after) > 80 and after.count(0) >= len(after) - 3, bad
    assert all(j <= PROBE_DRAFTS for j in after)
    for d in good:  # the others speculate at the full stride from their second cycle (the first scores pillars)
        assert d[0] == 0 and set(d[1:-1]) == {4}, d
    for r in reqs:  # lossless: every output equals plain greedy decoding's
        assert r.all_token_ids == truth[r.request_id] and r.finish_reason == "length"


def test_step_cost_fit_stays_sane_on_collinear_steady_state_steps():
    """Every step about the same size (a full batch, slowly growing contexts) with 3% timing noise: the fixed cost
    and the per-key cost are nearly collinear. The fit must stay non-negative, keep the fixed cost near its seed's
    share instead of trading it for a huge per-key cost (what clipping an unconstrained solve did on the H200),
    and predict the steps it saw."""
    true = (1.2e-3, 8e-7, 7e-9, 2e-8)
    m = StepCostModel(seed=(0.8e-3, 1e-6, 9e-9, 2e-8))
    rng = random.Random(1)
    works = []
    for i in range(400):
        w = StepWork(tokens=256 + rng.randint(-2, 2), full_keys=int(150_000 * (1 + 0.002 * i) * (1 + 0.01 * rng.gauss(0, 1))))
        works.append(w)
        m.observe(w, (true[0] + true[1] * w.tokens + true[2] * w.full_keys) * (1 + 0.03 * rng.gauss(0, 1)))
    c = m.coefficients()
    assert min(c) >= 0
    assert 0.4e-3 < c[0] < 2.4e-3 and 3e-9 < c[2] < 1.5e-8
    w = works[-1]
    predicted = c[0] + c[1] * w.tokens + c[2] * w.full_keys
    assert predicted == pytest.approx(true[0] + true[1] * w.tokens + true[2] * w.full_keys, rel=0.05)


def test_step_cost_fit_leaves_out_a_stall_but_follows_a_new_regime():
    """A step that compiled a kernel on its way (100x its work's price) is left out; three in a row are the step's
    new cost, and the fit follows them."""
    true = (1e-3, 1e-6, 5e-9, 2e-8)
    m = StepCostModel(seed=true)
    w = StepWork(tokens=256, full_keys=100_000)
    cost = true[0] + true[1] * w.tokens + true[2] * w.full_keys
    for _ in range(32):
        m.observe(w, cost)
    before = m.coefficients()
    m.observe(w, 100 * cost)  # a compile stall
    assert m.rejected == 1 and m.coefficients() == before
    for _ in range(3):  # the steps really got dearer
        m.observe(w, 20 * cost)
    assert m.rejected == 2  # the stall and the first dearer step are left out; from the third outlier in a row on, all count
    for _ in range(200):
        m.observe(w, 20 * cost)
    c = m.coefficients()
    assert c[0] + c[1] * w.tokens + c[2] * w.full_keys == pytest.approx(20 * cost, rel=0.05)
