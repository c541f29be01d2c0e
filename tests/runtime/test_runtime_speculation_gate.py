"""The batch-level speculation switch (runtime/speculation_gate.py): measures plain, then speculation, keeps the
faster, backs off while the same mode keeps winning, and re-measures when the batch changed under it."""

import pytest

from sparsespec_compile.runtime.request import Request
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.speculation_gate import PLAIN, SPECULATE, SpeculationGate
from sparsespec_compile.runtime.stride_policy import AdaptiveStride
from sparsespec_compile.runtime.step_cost import FixedStepCost


def run(gate: SpeculationGate, steps: int, rate: dict[str, float], requests: int = 64) -> list[str]:
    """Drive ``gate`` for ``steps`` steps of 1 ms, each mode producing ``rate[mode]`` tokens per step."""
    modes = []
    for _ in range(steps):
        modes.append(gate.mode)
        gate.observe(int(rate[gate.mode]), 1e-3, requests)
    return modes


def test_plain_is_measured_first_and_kept_when_speculation_does_not_pay():
    g = SpeculationGate(warm=2, window=4, exploit_first=16, exploit_max=64)
    modes = run(g, 12, {PLAIN: 64, SPECULATE: 40})
    assert modes == [PLAIN] * 6 + [SPECULATE] * 6
    assert g.winner == PLAIN and g.mode == PLAIN and g.goodput == {PLAIN: 64e3, SPECULATE: 40e3}
    modes = run(g, 16 + 12 + 32, {PLAIN: 64, SPECULATE: 40})
    # exploit 16, measure again (6 + 6), then the span doubles: 32 plain steps
    assert modes == [PLAIN] * 16 + [PLAIN] * 6 + [SPECULATE] * 6 + [PLAIN] * 32
    assert g.exploit == 32 and g.rounds == 2


def test_speculation_must_win_by_the_margin():
    g = SpeculationGate(warm=0, window=4, exploit_first=8, margin=0.1)
    run(g, 8, {PLAIN: 100, SPECULATE: 105})
    assert g.winner == PLAIN  # 5% faster is within the margin
    g = SpeculationGate(warm=0, window=4, exploit_first=8, margin=0.1)
    run(g, 8, {PLAIN: 100, SPECULATE: 120})
    assert g.winner == SPECULATE and g.speculating


def test_winner_change_resets_the_backoff():
    g = SpeculationGate(warm=0, window=2, exploit_first=4, exploit_max=64)
    run(g, 4 + 4 + 4 + 4, {PLAIN: 10, SPECULATE: 20})  # two rounds won by speculation: exploit doubled
    assert g.winner == SPECULATE and g.exploit == 8
    run(g, 8 + 4, {PLAIN: 30, SPECULATE: 20})  # the workload changed: plain wins the next round
    assert g.winner == PLAIN and g.exploit == 4


def test_a_round_over_a_changing_batch_is_measured_again():
    g = SpeculationGate(warm=0, window=2, exploit_first=4)
    for mode_requests in (64, 64, 16, 16):  # plain window at 64 requests, speculation's at 16: not comparable
        g.observe(10, 1e-3, mode_requests)
    assert g.winner is None and g.rounds == 1 and g.mode == PLAIN


def test_unmeasured_steps_advance_but_do_not_count():
    g = SpeculationGate(warm=0, window=2, exploit_first=4)
    g.observe(10, 0.0, 8)  # a capture step
    g.observe(10, 1e-3, 8)
    g.observe(30, 1e-3, 8)
    g.observe(30, 1e-3, 8)
    assert g.goodput == {PLAIN: 10e3, SPECULATE: 30e3}


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="window"):
        SpeculationGate(window=0)


def test_plain_mode_makes_the_policy_decode_plainly_without_refresh():
    """While the gate says plain, a request that would speculate decodes plainly, does not score pillars and does
    not probe: a stride-0 step."""
    gate = SpeculationGate(warm=0, window=1, exploit_first=1)
    policy = AdaptiveStride(8, FixedStepCost(0.0, 0.0, 1.0, 0.1), lambda ctx: 16, gate=gate)
    r = Request(list(range(1, 200)), SamplingParams(max_tokens=100))
    r.num_computed_tokens, r.has_pillars = 199, True
    for _ in range(4):
        r.acceptance.record(8, 8)
    assert not gate.speculating
    assert policy.options(r, 8, 64) == [0] and not policy.refresh_after(r, 0) and not r.wants_pillars
    gate.observe(1, 1e-3, 64)  # plain measured; now speculation's window
    assert gate.speculating
    assert policy.options(r, 8, 64)[0] == 8 and policy.refresh_after(r, 8)


def test_the_engine_gates_only_adaptive_single_device_speculation():
    from sparsespec_compile.runtime.speculation_gate import default_gate

    assert isinstance(default_gate(True, 8, 1), SpeculationGate)
    assert default_gate(True, 8, 2) is None  # tensor parallel: ranks must agree, the rank-0 prices decide
    assert default_gate(False, 8, 1) is None and default_gate(True, 0, 1) is None


def test_a_clearly_losing_speculative_window_stops_early():
    g = SpeculationGate(warm=2, window=100, exploit_first=16, early_steps=8, early_loss=0.15)
    modes = run(g, 102 + 2 + 8, {PLAIN: 60, SPECULATE: 20})  # plain's half, then speculation's warm + 8 steps
    assert modes[:102] == [PLAIN] * 102 and modes[102:] == [SPECULATE] * 10
    assert g.winner == PLAIN and g.mode == PLAIN and g.early_stops == 1 and g.rounds == 1
    g = SpeculationGate(warm=2, window=100, exploit_first=16, early_steps=8, early_loss=0.15)
    run(g, 102 + 2 + 8, {PLAIN: 60, SPECULATE: 55})  # 8% behind: within the early bound, the window goes on
    assert g.speculating and g.early_stops == 0


def test_no_speculative_half_when_too_few_steps_are_left():
    g = SpeculationGate(warm=2, window=4, exploit_first=16)
    left = [10]
    g.remaining = lambda: left[0]  # fewer than a round's 12 steps
    modes = run(g, 6 + 6, {PLAIN: 60, SPECULATE: 90})
    assert modes == [PLAIN] * 12 and g.skipped == 1 and g.winner is None
    left[0] = 1000  # a long request arrived: the next round measures speculation
    modes = run(g, 6 + 6, {PLAIN: 60, SPECULATE: 90})
    assert modes == [PLAIN] * 6 + [SPECULATE] * 6 and g.winner == SPECULATE
