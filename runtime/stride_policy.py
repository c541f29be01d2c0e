"""How many drafts a request makes this cycle (torch-free): a fixed stride, or the adaptive per-request choice.

``AdaptiveStride`` picks ``j`` in ``0..j_max`` (``j_max = min(stride, tokens left - 1)``) for one request at the
start of each of its cycles, maximising its expected tokens per unit of step cost:

    score(j) = E_j / (K_j + s_j * c0 / n)

* ``E_j`` — expected tokens of the cycle: ``1 + sum_{i<=j} prod_{m<=i} q_m`` from the request's own decayed
  conditional acceptance ``q`` (acceptance.py), smoothed towards the population's;
* ``K_j`` — the cycle's row costs from the measured step-cost model (step_cost.py): ``j`` draft rows (sparse when the
  request has pillars) and one verify row of ``j+1`` tokens (which re-reads its context's keys to score pillars); ``j = 0``
  is one plain decode row;
* ``s_j * c0 / n`` — its share of the fixed cost of the ``s_j`` steps the cycle spans (``j + 1``, + 1 sat out under
  delayed verification), ``n`` requests decoding.

For ``n`` requests making the same choice this is exactly the batch's tokens per second
(``n E / (s c0 + n K)``), so a request speculates only where that beats plain decoding: at batch 1 with a
launch-bound step (``c0`` large) it decodes plainly unless nearly every draft is accepted; at batch 256 with long
contexts (``c_full L`` large) it drafts. ``j = 0`` is plain decoding inside the same unified step. A request that
stopped speculating *probes* (one cycle of ``PROBE_DRAFTS`` drafts) after ``probe_interval`` plain cycles, doubling
the interval after each probe that does not bring it back (16, 32, ... 256 cycles: a never-matching request loses
at most ~3 steps per 16, then per 256). Lossless either way: ``j`` only changes what is proposed.
"""

from __future__ import annotations

from typing import Callable, Protocol

from .acceptance import AcceptanceStats
from .request import Request
from .speculation_gate import SpeculationGate
from .step_cost import one_pass

PROBE_DRAFTS = 2
PROBE_FIRST, PROBE_MAX = 16, 256
# Cycles whose score is within this share of the best may be shortened for phase balance (cycle_planner.py).
BALANCE_TOLERANCE = 0.03
RECHECK = 8  # a plain-decoding request's choice is re-priced every RECHECK cycles (its context and prices drift)
OPTIMISTIC_PRIOR = 0.8  # conditional acceptance assumed before any request has verified anything
TAIL = 2  # dense-tail keys of a draft row beyond its own drafts (the last verify chunk's accepted tokens, typically)


class CostModel(Protocol):
    def coefficients(self) -> tuple[float, float, float, float]: ...


class StridePolicy(Protocol):
    stride: int
    adaptive: bool

    def options(self, r: Request, j_max: int, num_decoding: int) -> list[int]: ...
    def refresh_after(self, r: Request, j: int) -> bool: ...
    def record(self, r: Request, drafted: int, accepted: int) -> None: ...


class FixedStride:
    """Every cycle drafts ``min(stride, j_max)`` (``adaptive=False``; stride 0 = plain decoding)."""

    adaptive = False

    def __init__(self, stride: int) -> None:
        self.stride = stride

    def options(self, r: Request, j_max: int, num_decoding: int) -> list[int]:
        return [j_max]

    def refresh_after(self, r: Request, j: int) -> bool:
        return self.stride > 0  # every verify refreshes, so a shortened cycle's successor still drafts sparsely

    def record(self, r: Request, drafted: int, accepted: int) -> None:
        r.acceptance.record(drafted, accepted)


class AdaptiveStride:
    """Per-request ``j`` from its acceptance and ``cost.coefficients()`` = ``(c0, c_tok, c_full, c_sparse)``.

    ``budget(context)``: pillar count of a context (SparseSpecConfig.budget); ``sparse_drafts``: drafts read pillars
    (False for draft="full"); ``delayed_verify``: a speculative cycle sits out one step after its verify;
    ``passes(n)``: how many times a row of ``n`` queries reads its keys (step_cost.step_work's, kernels.query_passes).
    ``gate``: the batch-level switch (speculation_gate.py); while it says plain, every cycle is a plain decode with no
    probe and no pillar refresh — a stride-0 step. None: the prices alone decide.
    """

    adaptive = True

    def __init__(self, stride: int, cost: CostModel, budget: Callable[[int], int], *, sparse_drafts: bool = True,
                 delayed_verify: bool = False, passes: Callable[[int], int] = one_pass,
                 gate: SpeculationGate | None = None) -> None:
        self.stride, self.cost, self.budget, self.passes = stride, cost, budget, passes
        self.sparse_drafts, self.delayed_verify = sparse_drafts, delayed_verify
        self.gate = gate
        self.population = AcceptanceStats(decay=0.99)  # every request's cycles: the prior of a request's own
        # The population's smoothed q for each j_max, kept while it records nothing: the same list for every
        # request priced in a step (it changes only when a cycle that drafted is recorded: ``cycles`` counts those).
        self._pop_q: dict[int, list[float]] = {}
        self._pop_at: tuple = ()
        self._passes: dict[int, int] = {}  # passes(n) of each n (a pure function; asked 8 times per pricing)

    # ---- the choice ---------------------------------------------------------------------------------------------
    def scores(self, r: Request, j_max: int, num_decoding: int, with_pillars: bool | None = None) -> list[float]:
        """``score(j)`` for ``j = 0..j_max`` (tokens per unit of cost; see the module docstring). ``with_pillars``:
        price the drafts as sparse (True) or full (False) rows; None: as ``r`` would draft now."""
        c0, c_tok, c_full, c_sparse = self.cost.coefficients()
        q = r.acceptance.conditional(j_max, self._population_q(j_max))
        ctx = r.num_computed_tokens
        share = c0 / max(1, num_decoding)
        sparse = self.sparse_drafts and (r.has_pillars if with_pillars is None else with_pillars)
        b = self.budget(ctx) if sparse else 0
        out = [1.0 / max(c_tok + c_full * (ctx + 1) + share, 1e-30)]
        drafts, tokens, p = 0.0, 1.0, 1.0  # tokens = expected_tokens(q, j), built up one position at a time
        for j in range(1, j_max + 1):
            p *= q[j - 1]
            tokens += p
            drafts += c_tok + (c_sparse * (b + TAIL + j) if sparse else c_full * (ctx + j))
            # attention over the context, once per q-block of the j + 1 queries, + the pillar scores (K only)
            verify = (j + 1) * c_tok + c_full * (self._num_passes(j + 1) * (ctx + j + 1) + 0.5 * ctx)
            steps = j + 1 + (1 if self.delayed_verify else 0)
            out.append(tokens / max(drafts + verify + steps * share, 1e-30))
        return out

    def _population_q(self, j_max: int) -> list[float]:
        pop = self.population
        if self._pop_at != (id(pop), pop.cycles):
            self._pop_q, self._pop_at = {}, (id(pop), pop.cycles)
        q = self._pop_q.get(j_max)
        if q is None:
            q = self._pop_q[j_max] = pop.conditional(j_max, [OPTIMISTIC_PRIOR] * j_max)
        return q

    def _num_passes(self, n: int) -> int:
        p = self._passes.get(n)
        if p is None:
            p = self._passes[n] = self.passes(n)
        return p

    def options(self, r: Request, j_max: int, num_decoding: int) -> list[int]:
        """The ``j`` this cycle may use, best first: the best, then those within ``BALANCE_TOLERANCE`` of it."""
        if j_max <= 0:
            return [0]
        if self.gate is not None and not self.gate.speculating:
            r.wants_pillars = False
            return [0]
        if r.probe_interval and 0 < r.plain_cycles < r.probe_interval and r.plain_cycles % RECHECK:
            # between probes a plain request's acceptance does not change (it judges no drafts): re-price it every
            # RECHECK cycles, not every step (256 requests re-priced every step cost ~11 ms of host time a step)
            r.plain_cycles += 1
            return [0]
        s = self.scores(r, j_max, num_decoding)
        best = _argmax(s)
        # Without pillars (after prefill, after plain decodes that did not score) drafts are full-attention rows, as
        # dear as plain decodes; if sparse drafts would pay, decode plainly once and score pillars for the next cycle.
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
            r.plain_cycles = 0  # a probe: draft a little to re-measure; back off if it does not pay
            r.probe_interval = min(2 * r.probe_interval, PROBE_MAX)
            return [min(PROBE_DRAFTS, j_max)]
        r.plain_cycles, r.probe_interval = 0, 0
        near = [j for j in range(1, j_max + 1) if j != best and s[j] >= (1 - BALANCE_TOLERANCE) * s[best]]
        return [best] + sorted(near, reverse=True)

    def refresh_after(self, r: Request, j: int) -> bool:
        """A speculative cycle's verify refreshes the pillars; a plain one only when a probe comes next (so the probe
        drafts sparsely, as speculation would). None while the gate says plain: nothing will draft from them."""
        if j == 0 and self.gate is not None and not self.gate.speculating:
            return False
        return j > 0 or r.wants_pillars or (r.probe_interval > 0 and r.plain_cycles + 1 > r.probe_interval)

    def record(self, r: Request, drafted: int, accepted: int) -> None:
        r.acceptance.record(drafted, accepted)
        self.population.record(drafted, accepted)


def _argmax(scores: list[float]) -> int:
    """The best ``j`` (the longest among equals)."""
    return max(range(len(scores)), key=lambda j: (scores[j], j))
