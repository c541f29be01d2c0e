"""The adaptive stride prices a batch of requests as arrays (AdaptiveStride.options_batch): it must choose exactly
what the one-request-at-a-time Python loop chose. ``Reference`` below is that loop, kept verbatim as the spec; the
tests run it side by side with the batched policy over drawn batches (every option list, every score bit for bit)
and over whole scheduler runs (every step's plan)."""

from __future__ import annotations

import copy
import math
import random

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from sparsespec_compile.runtime.acceptance import PRIOR_WEIGHT, AcceptanceStats
from sparsespec_compile.runtime.block_allocator import BlockAllocator
from sparsespec_compile.runtime.request import Request
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.scheduler import Scheduler, StepKind
from sparsespec_compile.runtime.speculation_gate import SpeculationGate
from sparsespec_compile.runtime.step_cost import SEED, FixedStepCost, StepCostModel, one_pass, step_work
from sparsespec_compile.runtime.stride_policy import (BALANCE_TOLERANCE, OPTIMISTIC_PRIOR, PROBE_DRAFTS, PROBE_FIRST,
                                                      PROBE_MAX, RECHECK, TAIL, AdaptiveStride, _best)


class Reference:
    """The adaptive stride priced request by request in Python floats (no options_batch: the cycle planner asks it
    one request at a time)."""

    adaptive = True

    def __init__(self, stride, cost, budget, *, sparse_drafts=True, delayed_verify=False, passes=one_pass, gate=None):
        self.stride, self.cost, self.budget, self.passes = stride, cost, budget, passes
        self.sparse_drafts, self.delayed_verify, self.gate = sparse_drafts, delayed_verify, gate
        self.population = AcceptanceStats(decay=0.99)

    @staticmethod
    def conditional(a, n, prior):
        out = []
        for i in range(n):
            judged = a.judged[i] if i < len(a.judged) else 0.0
            hits = a.accepted[i] if i < len(a.accepted) else 0.0
            out.append((hits + PRIOR_WEIGHT * prior[i]) / (judged + PRIOR_WEIGHT))
        return out

    def scores(self, r, j_max, num_decoding, with_pillars=None):
        c0, c_tok, c_full, c_sparse = self.cost.coefficients()
        q = self.conditional(r.acceptance, j_max, self.conditional(self.population, j_max, [OPTIMISTIC_PRIOR] * j_max))
        ctx = r.num_computed_tokens
        share = c0 / max(1, num_decoding)
        sparse = self.sparse_drafts and (r.has_pillars if with_pillars is None else with_pillars)
        b = self.budget(ctx) if sparse else 0
        out = [1.0 / max(c_tok + c_full * (ctx + 1) + share, 1e-30)]
        drafts, tokens, p = 0.0, 1.0, 1.0
        for j in range(1, j_max + 1):
            p *= q[j - 1]
            tokens += p
            drafts += c_tok + (c_sparse * (b + TAIL + j) if sparse else c_full * (ctx + j))
            verify = (j + 1) * c_tok + c_full * (self.passes(j + 1) * (ctx + j + 1) + 0.5 * ctx)
            steps = j + 1 + (1 if self.delayed_verify else 0)
            out.append(tokens / max(drafts + verify + steps * share, 1e-30))
        return out

    def options(self, r, j_max, num_decoding):
        if j_max <= 0:
            return [0]
        if self.gate is not None and not self.gate.speculating:
            r.wants_pillars = False
            return [0]
        if r.probe_interval and 0 < r.plain_cycles < r.probe_interval and r.plain_cycles % RECHECK:
            r.plain_cycles += 1
            return [0]
        s = self.scores(r, j_max, num_decoding)
        best = _argmax(s)
        r.wants_pillars = (best == 0 and self.sparse_drafts and not r.has_pillars
                           and _argmax(self.scores(r, j_max, num_decoding, with_pillars=True)) > 0)
        if r.wants_pillars:
            return [0]
        if best == 0:
            if not r.probe_interval:
                r.probe_interval = PROBE_FIRST
            r.plain_cycles += 1
            if r.plain_cycles <= r.probe_interval:
                return [0]
            r.plain_cycles = 0
            r.probe_interval = min(2 * r.probe_interval, PROBE_MAX)
            return [min(PROBE_DRAFTS, j_max)]
        r.plain_cycles, r.probe_interval = 0, 0
        near = [j for j in range(1, j_max + 1) if j != best and s[j] >= (1 - BALANCE_TOLERANCE) * s[best]]
        return [best] + sorted(near, reverse=True)

    def refresh_after(self, r, j):
        if j == 0 and self.gate is not None and not self.gate.speculating:
            return False
        return j > 0 or r.wants_pillars or (r.probe_interval > 0 and r.plain_cycles + 1 > r.probe_interval)

    def record(self, r, drafted, accepted):
        r.acceptance.record(drafted, accepted)
        self.population.record(drafted, accepted)


def _argmax(scores):
    return max(range(len(scores)), key=lambda j: (scores[j], j))


def _budget(ctx):
    return min(max(16, math.ceil(0.05 * ctx)), 2048, ctx)


def _passes(n):
    return -(-n // 4)


# Price lists: the H200 seed, KV-bound (speculation pays), launch-bound (it never does), and zeros that floor the
# denominators at 1e-30, besides drawn ones.
_PRICES = st.one_of(st.sampled_from([SEED, (0.0, 0.0, 1.0, 0.1), (1.0, 0.001, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0),
                                     (1e-3, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0)]),
                    st.tuples(*[st.floats(0.0, 1e-2, allow_subnormal=False)] * 4))
_HISTORY = st.lists(st.integers(1, 8).flatmap(lambda d: st.tuples(st.just(d), st.integers(0, d))), max_size=12)


@st.composite
def _batch(draw):
    stride = draw(st.integers(1, 8))
    policy_kw = dict(sparse_drafts=draw(st.booleans()), delayed_verify=draw(st.booleans()),
                     passes=draw(st.sampled_from([one_pass, _passes])))
    gate = draw(st.sampled_from([None, "plain", "speculate"]))
    reqs, j_maxes = [], []
    for _ in range(draw(st.integers(1, 12))):
        r = Request([1, 2, 3], SamplingParams(max_tokens=10 ** 6))
        r.num_computed_tokens = draw(st.integers(1, 200_000))
        r.has_pillars = draw(st.booleans())
        for d, a in draw(_HISTORY):
            r.acceptance.record(min(d, stride), min(a, d, stride))
        r.probe_interval = draw(st.sampled_from([0, PROBE_FIRST, 2 * PROBE_FIRST, PROBE_MAX]))
        r.plain_cycles = draw(st.integers(0, r.probe_interval + 1))
        r.wants_pillars = draw(st.booleans())
        reqs.append(r)
        j_maxes.append(draw(st.integers(-1, stride)))
    population = draw(_HISTORY)
    return (stride, draw(_PRICES), policy_kw, gate, population, reqs, j_maxes, draw(st.integers(0, 512)))


def _pair(stride, prices, policy_kw, gate, population):
    out = []
    for cls in (Reference, AdaptiveStride):
        g = None
        if gate is not None:
            g = SpeculationGate()
            g.mode = gate
        p = cls(stride, FixedStepCost(*prices), _budget, gate=g, **policy_kw)
        for d, a in population:
            p.population.record(min(d, stride), min(a, d, stride))
        out.append(p)
    return out


def _state(reqs):
    return [(r.plain_cycles, r.probe_interval, r.wants_pillars) for r in reqs]


@settings(max_examples=400, deadline=None)
@given(_batch())
def test_batched_options_and_scores_equal_the_per_request_loop(case):
    stride, prices, policy_kw, gate, population, reqs, j_maxes, num_decoding = case
    ref, new = _pair(stride, prices, policy_kw, gate, population)
    for r, j_max in zip(reqs, j_maxes):  # every score, bit for bit (== on floats), as drafted now, full and sparse
        for with_pillars in (None, False, True):
            assert new.scores(r, max(j_max, 0), num_decoding, with_pillars) == \
                ref.scores(r, max(j_max, 0), num_decoding, with_pillars)
    ref_reqs, new_reqs = copy.deepcopy(reqs), copy.deepcopy(reqs)
    expected = [ref.options(r, j_max, num_decoding) for r, j_max in zip(ref_reqs, j_maxes)]
    assert new.options_batch(new_reqs, j_maxes, num_decoding) == expected
    assert _state(new_reqs) == _state(ref_reqs)
    assert [new.refresh_after(r, o[0]) for r, o in zip(new_reqs, expected)] == \
        [ref.refresh_after(r, o[0]) for r, o in zip(ref_reqs, expected)]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0 + 2 ** -52, 3.0]), min_size=n + 1, max_size=n + 1),
             min_size=1, max_size=8),
    st.lists(st.integers(0, n), min_size=8, max_size=8))))
def test_best_breaks_ties_towards_the_longest_cycle_like_the_loop(case):
    import numpy as np

    rows, limits = case
    limits = limits[:len(rows)]
    assert _best(np.array(rows), limits) == [_argmax(row[:jm + 1]) for row, jm in zip(rows, limits)]


def _fake_results(plan, accept, rng):
    out = []
    for e in plan.entries:
        if e.kind is StepKind.VERIFY:
            n = 0
            while n < len(e.draft_token_ids) and rng.random() < accept:
                n += 1
            out.append(list(e.draft_token_ids[:n]) + [7])
        else:
            out.append([7] * e.num_logits)
    return out


@pytest.mark.parametrize("prices,accept,delayed,gated", [
    ("seed", 0.6, False, False), ("seed", 0.95, True, False), ("kv", 0.9, False, False), ("kv", 0.5, True, False),
    ("fit", 0.8, False, True), ("fit", 0.95, True, False)])
def test_whole_runs_make_the_same_plans(prices, accept, delayed, gated):
    """Two schedulers, one with the per-request loop and one with the batched policy, on the same requests and
    verifier draws (admissions, length limits, a step-cost fit fed synthetic times, a speculation gate): every
    step's plan — each row's request, kind, tokens, position, sparsity and pillar refresh — is the same."""
    runs = []
    for cls in (Reference, AdaptiveStride):
        rng = random.Random(7)
        cost = {"seed": FixedStepCost(*SEED), "kv": FixedStepCost(0.0, 0.0, 1.0, 0.1)}.get(prices) or StepCostModel()
        gate = SpeculationGate(warm=2, window=8, exploit_first=16, exploit_max=32, early_steps=4) if gated else None
        policy = cls(8, cost, _budget, delayed_verify=delayed, passes=_passes, gate=gate)
        s = Scheduler(BlockAllocator(4096, 16), stride=8, max_num_batched_tokens=1024, max_model_len=4096,
                      delayed_verify=delayed, policy=policy)
        plans, index = [], {}  # request -> its order of arrival (ids differ between the runs)
        for step in range(240):
            if step % 30 == 0:
                for _ in range(8):
                    r = Request(list(range(1, rng.randint(20, 400))),
                                SamplingParams(max_tokens=rng.randint(20, 300), ignore_eos=True))
                    index[r.request_id] = len(index)
                    s.add(r)
            p = s.schedule()
            plans.append([(index[e.request.request_id], e.kind, e.num_tokens, e.start_pos, e.sparse, e.refresh)
                          for e in p.entries])
            res = _fake_results(p, accept, rng)
            s.update(p, res)
            if prices == "fit" or gate is not None:
                w = step_work(p, _budget, _passes)
                seconds = 1e-3 + 8e-7 * w.tokens + 7e-9 * w.full_keys + 2e-8 * w.sparse_keys
                seconds *= 1 + 0.05 * rng.random()
                if prices == "fit":
                    cost.observe(w, seconds)
                if gate is not None:
                    gate.observe(sum(len(x) for x in res), seconds, len(p.entries))
        runs.append((plans, s.planner.stats.cycles_by_k))
    (ref_plans, ref_k), (new_plans, new_k) = runs
    assert sum(ref_k[1:]) > 50  # it speculated (and decoded plainly: the seed prices at 0.6)
    for step, (a, b) in enumerate(zip(ref_plans, new_plans)):
        assert a == b, step
    assert ref_k == new_k
