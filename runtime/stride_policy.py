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

import numpy as np

from .acceptance import AcceptanceStats, conditional
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
_PLAIN = [0]  # the options of a plain decode (shared: nothing mutates options)


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
        # The population's smoothed q for each j_max, kept while it records nothing: the same array for every
        # request priced in a step (it changes only when a cycle that drafted is recorded: ``cycles`` counts those).
        self._pop_q: dict[int, np.ndarray] = {}
        self._pop_at: tuple = ()
        self._consts: tuple[np.ndarray, ...] = ()  # _constants(), for the prices, batch and n of _consts_at
        self._consts_at: tuple = ()

    # ---- the choice ---------------------------------------------------------------------------------------------
    def scores(self, r: Request, j_max: int, num_decoding: int, with_pillars: bool | None = None) -> list[float]:
        """``score(j)`` for ``j = 0..j_max`` (tokens per unit of cost; see the module docstring). ``with_pillars``:
        price the drafts as sparse (True) or full (False) rows; None: as ``r`` would draft now."""
        sparse = self.sparse_drafts and (r.has_pillars if with_pillars is None else with_pillars)
        return self._price([r], max(j_max, 1), num_decoding)[int(sparse), 0, :j_max + 1].tolist()

    def _price(self, reqs: list[Request], n: int, num_decoding: int) -> np.ndarray:
        """``score(j)``, ``j = 0..n`` (``n >= 1``), of each of ``reqs``, all priced at once: ``[2, len(reqs), n + 1]``,
        the drafts full-attention rows in ``[0]``, sparse ones in ``[1]`` (``[1, ...]`` when drafts never read
        pillars).

        At B 256 (bench/host_step_cost.py --adaptive --prices seed --accept 0.6) the policy priced ~64 rows a step
        one by one in a Python loop, ~12 us each: 0.8 ms of the step's host time; as arrays, the ~33 requests of a
        step cost 0.18-0.35 ms, both draft variants together (a loaded 2-core CPU). Every entry is the float that
        loop gave (a test checks them bit for bit): it is built by the same IEEE operations in the same order —
        elementwise ops; ``cumprod`` and ``cumsum``, which accumulate left to right as ``p *= q``, ``tokens += p``
        and ``drafts += ...`` did (never pairwise), the tokens' sum starting at the bonus token's 1.0; integers
        (context + position) exact before they meet a float. A score of
        ``j <= j_max`` does not depend on ``j_max``, so one ``n`` serves every row."""
        coefficients = self.cost.coefficients()
        c0, c_tok, c_full, c_sparse = coefficients
        share = c0 / max(1, num_decoding)
        j, tail_j, passes, verify_tokens, step_shares = self._constants(n, coefficients, share)
        m = len(reqs)
        contexts = [r.num_computed_tokens for r in reqs]
        ctx = np.array(contexts, dtype=np.int64).reshape(m, 1)
        q = conditional([r.acceptance for r in reqs], n, self._population_q(n))
        tokens = np.cumsum(np.concatenate((np.ones((m, 1)), np.cumprod(q, axis=1)), axis=1), axis=1)
        ctx_j = ctx + j
        variants = 2 if self.sparse_drafts else 1
        draft = np.empty((variants, m, n))  # each draft row's cost: c_tok + c_keys * keys
        np.multiply(c_full, ctx_j, out=draft[0])
        if self.sparse_drafts:
            b = np.array([self.budget(c) for c in contexts], dtype=np.int64).reshape(m, 1)
            np.multiply(c_sparse, b + tail_j, out=draft[1])
        draft += c_tok
        plain = 1.0 / np.maximum(draft[0, :, 0] + share, 1e-30)  # a plain decode row is a full row at j = 1
        # attention over the context, once per q-block of the j + 1 queries, + the pillar scores (K only)
        verify = verify_tokens + c_full * (passes * (ctx_j + 1) + 0.5 * ctx)
        cost = np.cumsum(draft, axis=2)
        cost += verify
        cost += step_shares
        out = np.empty((variants, m, n + 1))
        out[:, :, 0] = plain
        np.divide(tokens[:, 1:], np.maximum(cost, 1e-30, out=cost), out=out[:, :, 1:])
        return out

    def _constants(self, n: int, coefficients: tuple, share: float) -> tuple[np.ndarray, ...]:
        """``j = 1..n``, ``j + TAIL``, ``passes(j + 1)``, ``(j + 1) c_tok`` and ``steps(j) * share``: the same for every
        row priced under these prices and this batch (kept until they change)."""
        key = (n, coefficients, share)
        if self._consts_at != key:
            j = np.arange(1, n + 1, dtype=np.int64)
            passes = np.array([self.passes(x + 1) for x in range(1, n + 1)], dtype=np.int64)
            steps = j + 1 + (1 if self.delayed_verify else 0)
            self._consts = (j, j + TAIL, passes, (j + 1) * coefficients[1], steps * share)
            self._consts_at = key
        return self._consts

    def _population_q(self, n: int) -> np.ndarray:
        pop = self.population
        if self._pop_at != (id(pop), pop.cycles):
            self._pop_q, self._pop_at = {}, (id(pop), pop.cycles)
        q = self._pop_q.get(n)
        if q is None:
            q = self._pop_q[n] = conditional([pop], n, [OPTIMISTIC_PRIOR] * n)[0]
        return q

    def options(self, r: Request, j_max: int, num_decoding: int) -> list[int]:
        """The ``j`` this cycle may use, best first: the best, then those within ``BALANCE_TOLERANCE`` of it."""
        return self.options_batch([r], [j_max], num_decoding)[0]

    def options_batch(self, reqs: list[Request], j_maxes: list[int], num_decoding: int) -> list[list[int]]:
        """``options`` of each of ``reqs`` (with its ``j_max``), the ones to price priced as one batch: a request's
        options read only its own state and what every request shares (prices, the population, the gate)."""
        if self.gate is not None and not self.gate.speculating:
            for r, j_max in zip(reqs, j_maxes):
                if j_max > 0:
                    r.wants_pillars = False
            return [_PLAIN] * len(reqs)
        out = [_PLAIN] * len(reqs)
        priced = []
        for i, (r, j_max) in enumerate(zip(reqs, j_maxes)):
            if j_max <= 0:
                continue
            if r.probe_interval and 0 < r.plain_cycles < r.probe_interval and r.plain_cycles % RECHECK:
                # between probes a plain request's acceptance does not change (it judges no drafts): re-price it
                # every RECHECK cycles, not every step (256 requests re-priced every step cost ~11 ms a step)
                r.plain_cycles += 1
                continue
            priced.append(i)
        if not priced:
            return out
        rows = [reqs[i] for i in priced]
        limits = [j_maxes[i] for i in priced]
        s = self._price(rows, max(limits), num_decoding)
        now = s[0]
        if self.sparse_drafts:  # each row as it would draft now: sparse where it has pillars
            now = s[np.array([r.has_pillars for r in rows], dtype=np.intp), np.arange(len(rows))]
        best = _best(now, limits)
        # Without pillars (after prefill, after plain decodes that did not score) drafts are full-attention rows, as
        # dear as plain decodes; if sparse drafts would pay, decode plainly once and score pillars for the next cycle.
        lacking = [k for k, r in enumerate(rows) if best[k] == 0 and not r.has_pillars] if self.sparse_drafts else []
        wants = set()
        if lacking:
            with_pillars = _best(s[1, lacking], [limits[k] for k in lacking])
            wants = {k for k, b in zip(lacking, with_pillars) if b > 0}
        for k, i in enumerate(priced):
            out[i] = self._decide(rows[k], limits[k], best[k], k in wants, now[k])
        return out

    def _decide(self, r: Request, j_max: int, best: int, wants_pillars: bool, s: np.ndarray) -> list[int]:
        """One priced request's options from its best ``j`` (probing and backing off while that is 0)."""
        r.wants_pillars = wants_pillars
        if wants_pillars:
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
        scores = s.tolist()
        floor = (1 - BALANCE_TOLERANCE) * scores[best]
        return [best] + [j for j in range(j_max, 0, -1) if j != best and scores[j] >= floor]

    def refresh_after(self, r: Request, j: int) -> bool:
        """A speculative cycle's verify refreshes the pillars; a plain one only when a probe comes next (so the probe
        drafts sparsely, as speculation would). None while the gate says plain: nothing will draft from them."""
        if j == 0 and self.gate is not None and not self.gate.speculating:
            return False
        return j > 0 or r.wants_pillars or (r.probe_interval > 0 and r.plain_cycles + 1 > r.probe_interval)

    def record(self, r: Request, drafted: int, accepted: int) -> None:
        if drafted == 0 == accepted:
            return  # a plain decode judges nothing (both records would return at once: ~250 of them a B 256 step)
        r.acceptance.record(drafted, accepted)
        self.population.record(drafted, accepted)


def _best(scores: np.ndarray, j_maxes: list[int]) -> list[int]:
    """Each row's best ``j <= j_max`` (the longest among equals: the first maximum of the row reversed). Scores are
    finite (costs >= 0, the denominators floored at 1e-30), so the maximum is the one Python's ``max`` would find."""
    n = scores.shape[1] - 1
    if min(j_maxes) < n:
        scores = np.where(np.arange(n + 1) <= np.array(j_maxes)[:, None], scores, -np.inf)
    return (n - np.argmax(scores[:, ::-1], axis=1)).tolist()
