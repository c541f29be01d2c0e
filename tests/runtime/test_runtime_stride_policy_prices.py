"""The step-cost fit's NNLS solve (StepCostModel._solve, run every step by the engine's outlier check) must give the
same coefficients, bit for bit, as the straightforward enumeration it replaced (``reference`` below, kept verbatim
as the spec): the adaptive stride's choices are made from them."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from sparsespec_compile.runtime.step_cost import SEED, StepCostModel, StepWork


def reference(model: StepCostModel) -> tuple[float, float, float, float]:
    n = 4
    m = [row[:] for row in model._a]
    rhs = model._b[:]
    for i in range(n):
        d = model.ridge * model._a[i][i] + 1e-30
        m[i][i] += d
        rhs[i] += d * model.seed[i]
    excited = [i for i in range(n) if model._a[i][i] > 0]
    best, best_obj = tuple(model.seed), None
    for mask in range(1, 1 << len(excited)):
        free = [i for k, i in enumerate(excited) if mask >> k & 1]
        sub = _solve4([[m[i][j] for j in free] for i in free], [rhs[i] for i in free])
        if any(x < 0 or x != x for x in sub):
            continue
        theta = [0.0 if i in excited else model.seed[i] for i in range(n)]
        for i, x in zip(free, sub):
            theta[i] = x
        obj = sum(theta[i] * m[i][j] * theta[j] for i in range(n) for j in range(n)) \
            - 2 * sum(t * r for t, r in zip(theta, rhs))
        if best_obj is None or obj < best_obj:
            best, best_obj = tuple(theta), obj
    return best


def _solve4(m, rhs):
    n = len(rhs)
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p], rhs[c], rhs[p] = m[p], m[c], rhs[p], rhs[c]
        piv = m[c][c]
        for r in range(c + 1, n):
            f = m[r][c] / piv
            if f:
                for k in range(c, n):
                    m[r][k] -= f * m[c][k]
                rhs[r] -= f * rhs[c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (rhs[r] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


# Steps like an engine's: a batch of rows (tokens), full keys of ~1e5-1e6, sparse keys only once drafts are sparse,
# and scored keys; or tiny and degenerate ones (all zeros but the constant, equal steps: collinear features).
_WORK = st.one_of(
    st.builds(StepWork, tokens=st.integers(1, 2048), full_keys=st.integers(0, 2_000_000),
              sparse_keys=st.integers(0, 100_000), score_keys=st.integers(0, 500_000)),
    st.builds(StepWork, tokens=st.integers(0, 4), full_keys=st.sampled_from([0, 1000]),
              sparse_keys=st.sampled_from([0, 7]), score_keys=st.just(0)))
_STEP = st.tuples(_WORK, st.one_of(st.floats(1e-5, 0.05), st.sampled_from([0.0, 0.004, 0.5])))


@settings(max_examples=150, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=60), st.sampled_from([SEED, (1e-3, 1e-6, 1e-10, 7e-11), (0, 0, 0, 0)]),
       st.sampled_from([0.9, 0.98, 1.0]), st.sampled_from([1e-3, 1e-9, 1.0]))
def test_solve_gives_the_reference_coefficients_bit_for_bit(steps, seed, forget, ridge):
    model = StepCostModel(seed=seed, forget=forget, ridge=ridge)
    for work, seconds in steps:
        model.observe(work, seconds)
        assert model._solve() == reference(model)
