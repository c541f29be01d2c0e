"""What a step costs, measured from the running steps (torch-free): the adaptive stride's price list.

A step's time is modelled as ``c0 + c_tok * tokens + c_full * full_keys + c_sparse * sparse_keys``:

* ``c0``: what every step pays whatever it holds — reading the weights once, the ~414 batch-independent kernel
  launches of a SmolLM2 step (~1.2 ms of device time on the H200 at B 256, besides attention), sampling set-up;
* ``c_tok``: per query token (the GEMMs' M dimension, the LM head row, its sample);
* ``c_full``: per key a full-attention row reads (its context; a verify row that refreshes pillars re-reads the
  keys of its context, not the values, for the scores: counted as half a read);
* ``c_sparse``: per key a PillarAttn draft row reads (pillars + dense tail; a gather, dearer per key than a full
  row's contiguous pages).

So a plain decode row at context L costs ``c_tok + c_full (L+1)``, a draft row ``c_tok + c_sparse (B + tail)`` and a
verify row of ``j+1`` tokens ``(j+1) c_tok + c_full (L+j+1)`` (+ ``c_full L / 2`` when it scores). ``StepCostModel``
fits the four coefficients by exponentially weighted least squares on (step work, measured seconds) pairs — on CUDA
the engine feeds it each step's device time (CUDA events from the step's first launch to its results' copy), on the
CPU the host wall time of the forward and sampling (real, but not what a GPU would pay) — with a small ridge towards
the seed so a direction no step has exercised yet (no sparse row so far) keeps the seed's value. ``FixedStepCost``
is a given price list (tests, or a table measured elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .step_plan import Refresh, StepKind, StepPlan

# Seed (seconds, 30 layers): per-kernel profiles of SmolLM2-shaped steps at B 256, 512-token prompts on the H200
# (bench/data/profile_{s0,k8}_b256_prompt512_h200.txt): ~1.2 ms of GEMMs, norms and sampling whatever the batch
# holds; +0.8 us per token (a k = 8 step's 483 tokens against stride 0's 256); 7 ns per full-attention key (1.19 ms
# for 166k keys); ~2e-8 s per sparse draft key (a draft row's attention, scoring and selection over 32k draft keys
# came to ~1.2 ms). Only the ratios matter to the stride choice; the fit replaces them after a few dozen steps.
SEED = (1.2e-3, 8e-7, 7e-9, 2e-8)


@dataclass(frozen=True)
class StepWork:
    """What one step asks of the device (the regression's features, and the KV half of the bytes floor)."""

    tokens: int = 0
    full_keys: int = 0  # keys read by full-attention rows (prefill, verify, plain decode, dense drafts), per pass
    sparse_keys: int = 0  # keys read by PillarAttn draft rows
    score_keys: int = 0  # keys re-read to score pillars (context before each scoring verify chunk)

    @property
    def kv_tokens_read(self) -> int:
        """Keys the attention read (the KV half of the bytes-moved floor; scoring re-reads K only, left out)."""
        return self.full_keys + self.sparse_keys

    def features(self) -> tuple[float, float, float, float]:
        return (1.0, float(self.tokens), self.full_keys + 0.5 * self.score_keys, float(self.sparse_keys))


def one_pass(num_tokens: int) -> int:
    return 1


def step_work(plan: StepPlan, budget: Callable[[int], int], passes: Callable[[int], int] = one_pass) -> StepWork:
    """The work of ``plan``; ``budget(context)`` is the pillar count B of a context (SparseSpecConfig.budget);
    ``passes(n)`` how many times the attention reads the keys of a row of ``n <= 16`` queries (one per q-block:
    kernels.query_passes) — a 9-token verify row of a 4-head group reads its context 3 times, of a 3-head group twice.
    Prefill chunks count their context once (compute-bound: their passes are not the cost)."""
    tokens = full = sparse = score = 0
    pass_of: dict[int, int] = {}  # passes(n) once per row length of the step, not once per row (a pure function)
    draft, scored = StepKind.DRAFT, Refresh.SCORE
    for e in plan.entries:
        n = e.num_tokens
        tokens += n
        if e.sparse and e.kind is draft:
            sparse += budget(e.draft_start) + e.seq_len - e.draft_start  # budget() never exceeds the context
        elif n <= 16:
            p = pass_of.get(n)
            if p is None:
                p = pass_of[n] = passes(n)
            full += e.seq_len * p
        else:
            full += e.seq_len
        if e.refresh is scored:
            score += e.start_pos
    return StepWork(tokens, full, sparse, score)


class FixedStepCost:
    """A given price list ``(c0, c_tok, c_full, c_sparse)`` in any unit; ``observe`` ignores measurements."""

    def __init__(self, c0: float, c_tok: float, c_full: float, c_sparse: float) -> None:
        self._theta = (float(c0), float(c_tok), float(c_full), float(c_sparse))
        if min(self._theta) < 0:
            raise ValueError(f"step costs must be >= 0, got {self._theta}")

    def observe(self, work: StepWork, seconds: float) -> None:
        pass

    def coefficients(self) -> tuple[float, float, float, float]:
        return self._theta


class StepCostModel:
    """Exponentially weighted least squares of step seconds on ``StepWork.features()`` (4 coefficients).

    ``forget`` per observed step (0.98: the last ~50 steps carry the fit, so the prices follow the context as it
    grows and the batch as it drains). ``ridge``: pull towards ``seed`` relative to each feature's own scale, plus a
    tiny absolute pull so an unexcited feature (all zeros so far) keeps its seed exactly.
    """

    def __init__(self, seed: tuple[float, float, float, float] = SEED, forget: float = 0.98,
                 ridge: float = 1e-3, outlier: float = 8.0) -> None:
        if len(seed) != 4 or min(seed) < 0:
            raise ValueError(f"StepCostModel.seed must be 4 costs >= 0, got {seed}")
        if not 0.0 < forget <= 1.0:
            raise ValueError(f"StepCostModel.forget must be in (0, 1], got {forget}")
        self.seed, self.forget, self.ridge = tuple(float(x) for x in seed), forget, ridge
        self._a = [[0.0] * 4 for _ in range(4)]  # sum of w f f^T
        self._b = [0.0] * 4  # sum of w f y
        self._theta: tuple[float, float, float, float] | None = tuple(self.seed)
        self.observed = 0
        self.outlier = outlier
        self.rejected = 0  # observations left out as stalls
        self._stalls = 0  # consecutive ones

    def observe(self, work: StepWork, seconds: float) -> None:
        if not seconds > 0:
            return  # no measurement (a step that captured a graph, or a timer that did not run)
        f, g = work.features(), self.forget
        # A step that compiled a kernel variant on its way (a first eager mix of prefill and speculative rows: 0.5-1.7
        # s on the H200 against ~5 ms) prices nothing: once the fit has a few dozen steps, one more than ``outlier``
        # times its prediction is left out; three such in a row are a new regime, and count.
        if self.observed >= 16 and seconds > self.outlier * sum(a * b for a, b in zip(self.coefficients(), f)):
            self._stalls += 1
            if self._stalls < 3:
                self.rejected += 1
                return
        else:
            self._stalls = 0
        for i in range(4):
            self._b[i] = g * self._b[i] + f[i] * seconds
            row = self._a[i]
            for j in range(4):
                row[j] = g * row[j] + f[i] * f[j]
        self._theta = None  # solved lazily: cycles start far less often than steps end
        self.observed += 1

    def coefficients(self) -> tuple[float, float, float, float]:
        if self._theta is None:
            self._theta = self._solve()
        return self._theta

    def _solve(self) -> tuple[float, float, float, float]:
        # min over theta >= 0 of theta^T (A + D) theta - 2 (b + D seed)^T theta, D = ridge * diag(A) + 1e-30:
        # a scale-free ridge (features span 1 .. 1e7). Costs cannot be negative, and clipping an unconstrained
        # solution is not the constrained optimum: in steady state the fixed cost and the per-key cost are nearly
        # collinear (every step reads about as many keys), and the H200 fit went to c0 = -0.19 s with c_full =
        # 1.2 us a key (clipped: c0 = 0, prices ~150x the seed). So: exact non-negative least squares, by
        # enumerating the supports (at most 15 for 4 coefficients), each an unconstrained solve on its free coefficients.
        n = 4
        m = [row[:] for row in self._a]
        rhs = self._b[:]
        for i in range(n):
            d = self.ridge * self._a[i][i] + 1e-30
            m[i][i] += d
            rhs[i] += d * self.seed[i]
        # A feature no step has exercised (all zeros so far: no sparse row yet) keeps its seed: it has no cross
        # terms, and its zero and its seed would tie in the objective
        excited = tuple(i for i in range(n) if self._a[i][i] > 0)
        best, best_obj = tuple(self.seed), None
        fixed = [0.0 if i in excited else self.seed[i] for i in range(n)]
        for free in _supports(excited):
            sub = _solve4([[m[i][j] for j in free] for i in free], [rhs[i] for i in free])
            if not all(x >= 0 for x in sub):  # a negative or NaN coefficient
                continue
            theta = fixed[:]
            for i, x in zip(free, sub):
                theta[i] = x
            # sums of lists, not of generators: the same terms in the same order (the same floats), and faster
            obj = sum([ti * mij * tj for ti, row in zip(theta, m) for mij, tj in zip(row, theta)]) \
                - 2 * sum([t * r for t, r in zip(theta, rhs)])
            if best_obj is None or obj < best_obj:
                best, best_obj = tuple(theta), obj
        return best  # type: ignore[return-value]


_SUPPORTS: dict[tuple[int, ...], list[list[int]]] = {}


def _supports(excited: tuple[int, ...]) -> list[list[int]]:
    """Every non-empty subset of ``excited``, in the order of the bit masks 1 .. 2^len - 1 (at most 15)."""
    out = _SUPPORTS.get(excited)
    if out is None:
        out = _SUPPORTS[excited] = [[i for k, i in enumerate(excited) if mask >> k & 1]
                                    for mask in range(1, 1 << len(excited))]
    return out


def _solve4(m: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (n <= 4: ~100 flops, no numpy on the scheduler's side). The
    engine solves up to 15 of these a step (the fit's outlier check), so the pivot search is a loop, not ``max``
    with a key (the same pivot: the first of the largest) — with the list sums above, the whole solve went from
    160-190 to 100-130 us (micro-timed on a loaded 2-core CPU), its coefficients unchanged bit for bit (tested)."""
    n = len(rhs)
    for c in range(n):
        p, top = c, abs(m[c][c])
        for r in range(c + 1, n):
            v = abs(m[r][c])
            if v > top:
                p, top = r, v
        m[c], m[p], rhs[c], rhs[p] = m[p], m[c], rhs[p], rhs[c]
        row = m[c]
        piv = row[c]
        for r in range(c + 1, n):
            f = m[r][c] / piv
            if f:
                other = m[r]
                for k in range(c, n):
                    other[k] -= f * row[k]
                rhs[r] -= f * rhs[c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        row = m[r]
        x[r] = (rhs[r] - sum([row[k] * x[k] for k in range(r + 1, n)])) / row[r]
    return x
