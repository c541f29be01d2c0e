"""Sampling kernels against their torch reference (kernels/sampling_reference.py): the same noise, so the same
tokens, and the same kept-set statistics; the reference's distribution is tested statistically in
tests/runtime/test_sampler_distribution.py."""

import pytest
import torch
from interpreter_bounds import checked

from sparsespec_compile.kernels import sampling_reference as ref
from sparsespec_compile.kernels.sampling_triton import BLOCK, CHUNK, TUNE_SHAPES, residual, sample_rows
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.verify import Drafts, rejection_sample, sample

V = 203  # odd: the last block is partial


@pytest.fixture(autouse=True)
def bounds_checked():
    """Every launch of these tests indexes only inside its tensor arguments (interpreter_bounds)."""
    with checked():
        yield


def hard_rows(g: torch.Generator) -> torch.Tensor:
    """Logit rows [R, V] with every case the threshold search must get exactly right."""
    x = torch.randn(12, V, generator=g) * 3
    x[0] = 1.0  # every token tied
    x[1, 7:] = float("-inf")  # only 7 valid tokens
    x[2, ::3] = x[2].max() + 1  # a tie group at the top
    x[3] = (torch.randn(V, generator=g) * 2).round()  # many tie groups
    x[4, 1:] = float("-inf")  # a single valid token
    x[5] = torch.randn(V, generator=g) * 40  # peaked
    x[6] = torch.randn(V, generator=g) * 1e-3  # nearly flat
    x[7, 50] = 1e4  # one dominant token
    x[8] = -x[8].abs() - 100  # all large negative
    return x


CONFIGS = [  # (inv_temp, top_k, top_p, greedy)
    (1.0, V, 1.0, False), (1 / 0.6, V, 0.95, False), (1.0, 5, 1.0, False), (2.0, 20, 0.8, False),
    (1.0, V, 1e-6, False), (0.5, 1, 1.0, False), (1.3, 300, 0.5, False), (1.0, V, 1.0, True),
]


def run_both(x, dtype, configs=CONFIGS, modes=None, **shape):
    rows, cfg = [], []
    for i in range(x.shape[0]):
        for c in configs:
            rows.append(i)
            cfg.append(c)
    r = torch.tensor(rows)
    it, tk, tp, gr = (torch.tensor(v) for v in zip(*cfg))
    it, tp = it.float(), tp.float()
    seeds = torch.randint(0, 1 << 62, (len(rows),), generator=torch.Generator().manual_seed(3))
    xd = x.to(dtype)
    got = sample_rows(xd, r, it, tk, tp, gr, seeds, _modes=modes, **shape)
    want = ref.sample_rows_reference(xd[r], it, tk, tp, gr, seeds)
    return got, want


def assert_same(got, want):
    (tok, st), (tok_r, st_r) = got, want
    assert torch.equal(tok, tok_r)
    torch.testing.assert_close(st[:, :2], st_r[:, :2], rtol=0, atol=0)  # max and threshold: exact present values
    torch.testing.assert_close(st[:, 2:], st_r[:, 2:], rtol=1e-5, atol=1e-6)  # sums: summation order differs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference_on_hard_rows(dtype):
    x = hard_rows(torch.Generator().manual_seed(0))
    if dtype == torch.float16:  # (half the rows: the interpreter runs one program at a time)
        x = x[[0, 1, 3, 4, 5, 7]].clamp(-6e4, 6e4)
    modes = []
    assert_same(*run_both(x, dtype, modes=modes))
    assert {0, 1, 2, 3} <= set(modes[0].tolist())  # greedy, no filter, candidates, a flat row's full-row race


SEARCHING = [(1 / 0.6, V, 0.95, False), (1.0, 5, 1.0, False), (2.0, 20, 0.8, False), (1.3, 300, 0.5, False),
             (1.0, V, 1e-6, False), (0.7, 40, 1.0, False)]


def test_every_path_of_the_search_matches_the_reference():
    """Rows cut into 4 chunks, 8 candidates for top-p and 16 slots: top-p nuclei larger than the candidates (the
    mass search over the whole row), top-k sets and tie groups that overflow the slots (the full-row race)."""
    x = hard_rows(torch.Generator().manual_seed(4))[[0, 2, 3, 5, 6, 9]]
    modes = []
    assert_same(*run_both(x, torch.float32, SEARCHING, modes, chunk=64, cap=8, capb=16))
    assert {2, 3, 4} <= set(modes[0].tolist())


def test_ties_across_chunks_signed_zeros_and_overflowing_ties():
    v = 70
    x = torch.full((5, v), -3.0)
    x[0, [5, 20, 40, 69]] = 2.0  # greedy: the first of the tied maxima, in different chunks
    x[1, :30] = 1.0  # 30 tied at the top: top-k 3 keeps all 30 (more than the 16 slots)
    x[2, :25] = 0.0
    x[2, 25:50] = -0.0  # -0.0 == +0.0: one tie group of 50 for top-k 10 and top-p
    x[3, ::2] = float("-inf")
    x[3, 1::7] = 5.0  # a tied top among -inf: top-p 0.01 keeps the tie group
    x[4] = torch.linspace(-1, 1, v)  # distinct values: top-p keeps more than the 8 candidates
    cfg = [(1.0, v, 1.0, True), (1.0, 3, 1.0, False), (1.0, 10, 0.9, False), (1.0, v, 0.01, False),
           (1.0, v, 0.9, False)]
    r = torch.arange(5)
    it, tk, tp, gr = (torch.tensor(c) for c in zip(*cfg))
    it, tp = it.float(), tp.float()
    seeds = torch.arange(5) * 7919
    for shape in (dict(chunk=16, cap=8, capb=16), {}):
        got = sample_rows(x, r, it, tk, tp, gr, seeds, **shape)
        assert_same(got, ref.sample_rows_reference(x, it, tk, tp, gr, seeds))
        assert got[0][0].item() == 5


def test_a_rows_token_and_stats_do_not_depend_on_its_batch():
    """The same row, seed and parameters alone, then among other rows (and more of them): bit-identical."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, V, generator=g) * 2
    cfg = (torch.tensor([1 / 0.7]), torch.tensor([30]), torch.tensor([0.9]), torch.tensor([False]))
    seed = torch.tensor([12345])
    alone = sample_rows(x, torch.tensor([4]), *cfg, seed, chunk=64, cap=8, capb=16)
    n = 6
    rows = torch.tensor([0, 4, 2, 8, 4, 1])
    it = torch.tensor([1.0, 1 / 0.7, 0.5, 2.0, 1 / 0.7, 1.0])
    tk = torch.tensor([V, 30, 3, V, 30, V])
    tp = torch.tensor([1.0, 0.9, 0.5, 0.8, 0.9, 1.0])
    gr = torch.tensor([False, False, False, False, False, True])
    seeds = torch.tensor([1, 12345, 3, 4, 12345, 6])
    batch = sample_rows(x, rows, it, tk, tp, gr, seeds, chunk=64, cap=8, capb=16)
    for j in (1, 4):
        assert batch[0][j] == alone[0][0] and torch.equal(batch[1][j], alone[1][0])
    assert n == rows.shape[0]


def test_launcher_rejects_shapes_that_would_index_outside_its_buffers():
    x = torch.zeros(1, V)
    args = (torch.tensor([0]), torch.ones(1), torch.tensor([5]), torch.ones(1), torch.tensor([False]),
            torch.tensor([0]))
    for bad in (dict(chunk=48), dict(chunk=8), dict(cap=40, capb=32), dict(capb=24), dict(cap=0, capb=16)):
        with pytest.raises(ValueError):
            sample_rows(x, *args, **bad)


def test_kernel_reads_rows_in_place_and_greedy_rows_take_the_first_argmax():
    x = torch.zeros(3, V)
    x[1, [4, 9]] = 2.0  # tied maximum: greedy takes the first index (torch.argmax), top-p 1e-6 keeps both
    seeds = torch.arange(2)
    one = lambda v, dt: torch.full((2,), v, dtype=dt)  # noqa: E731
    tok, st = sample_rows(x, torch.tensor([1, 1]), one(1.0, torch.float32), one(V, torch.int64),
                          torch.tensor([1.0, 1e-6]), torch.tensor([True, False]), seeds)
    assert tok[0].item() == 4 and tok[1].item() in (4, 9) and st[0, 3].item() == 1.0


def test_residual_kernel_matches_reference():
    g = torch.Generator().manual_seed(1)
    n = 10
    t = torch.randn(n, V, generator=g) * 2
    d = t + torch.randn(n, V, generator=g)
    d[3] = t[3]  # p == q: the all-zero residual falls back to p
    it = torch.rand(n, generator=g) + 0.5
    tk = torch.tensor([V, 10] * (n // 2))
    tp = torch.tensor([0.9, 1.0] * (n // 2))
    gr = torch.zeros(n, dtype=torch.bool)
    seeds = torch.randint(0, 1 << 62, (n,), generator=g)
    _, ts = ref.sample_rows_reference(t, it, tk, tp, gr, seeds)
    _, ds = ref.sample_rows_reference(d, it, tk, tp, gr, seeds + 1)
    need = torch.ones(n, dtype=torch.bool)
    need[5] = False
    out = residual(t, torch.arange(n), ts, d, torch.arange(n), ds, it, seeds, need, torch.full((n,), -7))
    want = ref.residual_reference(t, ts, d, ds, it, seeds)
    assert torch.equal(out[need], want[need]) and out[5].item() == -7


def test_verification_through_the_kernels_equals_the_reference_path():
    g = torch.Generator().manual_seed(2)
    n, k, v = 6, 3, 40
    target = torch.randn(n, k + 1, v, generator=g) * 2
    draft = target[:, :k] + torch.randn(n, k, v, generator=g)
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.2, top_k=5, seed=4)] * 2
    seeds = torch.randint(0, 1 << 62, (n * k,), generator=g)
    dp = [p for p in params for _ in range(k)]
    d, q = sample(draft.reshape(n * k, v), dp, seeds, impl="triton")
    d_r, q_r = sample(draft.reshape(n * k, v), dp, seeds, impl="reference")
    assert torch.equal(d, d_r)
    vseeds = torch.randint(0, 1 << 62, (n, k + 1), generator=g)
    nd = torch.tensor([3, 3, 2, 0, 1, 3])
    out = [rejection_sample(d.view(n, k), Drafts.dense(draft, q.view(n, k, -1)), target, params, vseeds,
                            num_drafts=nd, impl=impl) for impl in ("triton", "reference")]
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_need_stats_changes_nothing():
    """Rows whose stats nobody reads (plain decodes) get them anyway: the search costs a few sweeps either way."""
    x = hard_rows(torch.Generator().manual_seed(5))[[0, 3, 5, 9]]
    n = x.shape[0]
    cfg = [(1 / 0.6, V, 0.95), (2.0, 20, 0.8)]
    r = torch.arange(n).repeat_interleave(len(cfg))
    it, tk, tp = (torch.tensor([c[i] for c in cfg] * n) for i in range(3))
    it, tp = it.float(), tp.float()
    gr = torch.zeros(r.shape[0], dtype=torch.bool)
    seeds = torch.randint(0, 1 << 62, r.shape, generator=torch.Generator().manual_seed(6))
    tok, st = sample_rows(x, r, it, tk, tp, gr, seeds, need_stats=torch.zeros_like(gr))
    tok2, st2 = sample_rows(x, r, it, tk, tp, gr, seeds)
    assert torch.equal(tok, tok2) and torch.equal(st, st2)
    assert_same((tok, st), ref.sample_rows_reference(x[r], it, tk, tp, gr, seeds))


def test_verify_path_at_a_vocabulary_of_many_chunks_and_a_partial_last_block():
    """The shape of the verify launches that met an illegal memory access on the H200 (V 151,936 = 37 chunks of
    4096 + 384, N 32 x (k + 1) target and N x k draft rows), scaled down: two chunks, the last one and the
    residual's last block partial, bounds-checked, equal to the reference (unfiltered and top-p rows)."""
    g = torch.Generator().manual_seed(11)
    n, k, v = 2, 2, CHUNK + 3 * BLOCK // 8
    target = torch.randn(n, k + 1, v, generator=g).to(torch.bfloat16)
    draft = (target[:, :k].float() + torch.randn(n, k, v, generator=g)).to(torch.bfloat16)
    for params in (SamplingParams(temperature=0.6), SamplingParams(temperature=0.6, top_p=0.95)):
        out = []
        for impl in ("triton", "reference"):
            sg = torch.Generator().manual_seed(5)
            d, q = sample(draft.reshape(n * k, v), params, generator=sg, impl=impl)
            out.append((d, rejection_sample(d.view(n, k), Drafts.dense(draft, q.view(n, k, -1)), target, params,
                                            generator=sg, impl=impl)))
        (d, (a, t)), (d_r, (a_r, t_r)) = out
        assert torch.equal(d, d_r) and torch.equal(a, a_r) and torch.equal(t, t_r), params
        assert bool((a < k).any()), "no rejection: the residual kernel did not run"


def test_residual_launcher_refuses_inconsistent_buffers():
    t = torch.zeros(4, V)
    rows, st, it, seeds, need = torch.arange(2), torch.ones(2, 5), torch.ones(2), torch.arange(2), torch.ones(
        2, dtype=torch.bool)
    ok = (t, rows, st, t, rows, st, it, seeds, need, torch.zeros(2, dtype=torch.int64))
    residual(*ok)
    bad = {1: rows.float(), 2: torch.ones(2, 4), 5: torch.ones(3, 5), 3: torch.zeros(4, V + 1), 8: need.int(),
           9: torch.zeros(2, dtype=torch.int32), 6: it.double()}
    for i, x in bad.items():
        args = list(ok)
        args[i] = x
        with pytest.raises(ValueError):
            residual(*args)


def test_rows_without_filters_skip_the_search_and_match_the_reference():
    """top_k / top_p None (no row filters, known on the host): the sweep and the setup alone, the same tokens and
    stats as the full launch sequence and the reference; one of the two None is refused."""
    x = hard_rows(torch.Generator().manual_seed(9))
    n = x.shape[0]
    it = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5
    gr = torch.arange(n) % 3 == 0
    seeds = torch.randint(0, 1 << 62, (n,), generator=torch.Generator().manual_seed(2))
    modes = []
    got = sample_rows(x, torch.arange(n), it, None, None, gr, seeds, _modes=modes, chunk=64)
    full = sample_rows(x, torch.arange(n), it, torch.full((n,), V), torch.ones(n), gr, seeds, chunk=64)
    assert torch.equal(got[0], full[0]) and torch.equal(got[1], full[1]) and modes[0].max().item() <= 1
    assert_same(got, ref.sample_rows_reference(x, it, torch.full((n,), V), torch.ones(n), gr, seeds))
    with pytest.raises(ValueError):
        sample_rows(x, torch.arange(n), it, None, torch.ones(n), gr, seeds)


# (seed, counter) whose hash has top 24 bits all ones: found by search (ref.mix32 over seeds 0..2**20, counters < 64)
PLANTED_SEED, PLANTED_AT = 986295, 8


def test_noise_at_the_top_hash_is_below_one():
    """The hash 2**24 - 1 once gave U = ((2**24 - 1) + 0.5) / 2**24, which rounds to 1.0 in float32: E = -log U = 0 and
    a race key of +inf (that token always won) or, in the residual, -inf in torch and +inf on the GPU (the kernel
    computes 0 - log U = +0.0): the H200 check's 1-in-64 residual mismatch. Now U = (2j + 1) / 2**24 is exact."""
    seeds, idx = torch.tensor([PLANTED_SEED]), torch.tensor([[PLANTED_AT]])
    h = ref.mix32(ref.mix32(idx) ^ ref.row_key(seeds)[:, None])
    assert int(h) >> 8 == (1 << 24) - 1  # the planted counter is the top hash
    u = ref.uniform(seeds, idx)
    assert u.item() == 1 - 2.0 ** -24 and (-u.log()).item() > 0
    lo = ref.uniform(torch.arange(4096), torch.arange(64).expand(4096, 64))
    assert bool(((lo > 0) & (lo < 1)).all()) and bool(((lo * (1 << 24)) % 2 == 1).all())  # odd multiples of 2**-24


@pytest.mark.parametrize("path", ["no filter", "candidates", "full-row race"])
def test_a_token_of_negligible_probability_never_wins_at_the_top_hash(path):
    """Every race of the kernel (the first sweep's, the candidates', the full row's) at the planted counter: its
    token has probability ~e-30 and must lose (with U = 1.0 it won every time, in the kernel and the reference)."""
    v = 40
    x = torch.zeros(1, v)
    x[0, PLANTED_AT], x[0, 3] = -30.0, -40.0  # top-k 39 drops token 3 and keeps the planted one
    tk, shape, mode = {"no filter": (v, {}, 1), "candidates": (39, {}, 2),  # 39 candidates, 39 > 16 slots:
                       "full-row race": (39, dict(chunk=16, cap=8, capb=16), 3)}[path]
    args = (torch.ones(1), torch.tensor([tk]), torch.ones(1), torch.tensor([False]), torch.tensor([PLANTED_SEED]))
    modes = []
    got = sample_rows(x, torch.tensor([0]), *args, _modes=modes, **shape)
    assert got[0].item() != PLANTED_AT and modes[0].item() == mode
    assert_same(got, ref.sample_rows_reference(x, *args))


def test_residual_at_the_top_hash_matches_the_reference():
    """The H200's mismatch, planted: the residual max(p - q, 0) is positive but negligible at the top-hash token."""
    v = 16
    t = torch.zeros(1, v)
    d = torch.zeros(1, v)
    t[0, PLANTED_AT], d[0, PLANTED_AT] = -40.0, -45.0  # w ~ e-18 there
    d[0, 0] = 2.0  # the draft over-weights token 0: the residual's mass is spread over the others
    one = lambda x, dt: torch.tensor([x], dtype=dt)  # noqa: E731
    args = (one(1.0, torch.float32), one(v, torch.int64), one(1.0, torch.float32), one(False, torch.bool))
    seeds = one(PLANTED_SEED, torch.int64)
    _, ts = ref.sample_rows_reference(t, *args, seeds)
    _, ds = ref.sample_rows_reference(d, *args, seeds + 1)
    out = residual(t, torch.tensor([0]), ts, d, torch.tensor([0]), ds, args[0], seeds, torch.tensor([True]),
                   torch.full((1,), -1))
    want = ref.residual_reference(t, ts, d, ds, args[0], seeds)
    assert out.item() == want.item() != PLANTED_AT


@pytest.mark.parametrize("shape", TUNE_SHAPES, ids=lambda s: "chunk%d_cap%d_capb%d" % s)
def test_bench_tune_shapes_stay_inside_their_buffers(shape):
    """bench/sampler.py's tune section met an illegal memory access on the H200 (with an earlier kernel). Each of
    its shapes, bounds-checked, at a vocabulary of several chunks whose last chunk and block are partial: language-
    model-like rows (candidates), a flat row (the mass search), a tie group wider than the slots, -inf; the filters
    the tune section times, a greedy row beside them; tokens and stats equal to the reference."""
    chunk, cap, capb = shape
    v = 2 * 8192 + 1000 + 3  # 9 chunks of 2048 / 5 of 4096 / 3 of 8192, the last partial
    g = torch.Generator().manual_seed(21)
    rank = torch.rand(v, generator=g).argsort().float() + 1
    x = torch.stack([-rank.log() + 0.05 * torch.randn(v, generator=g), torch.randn(v, generator=g),
                     torch.zeros(v)])
    x[2, capb + 7:] = -3.0  # a top tie group of capb + 7 tokens: overflows the slots
    x[2, ::5] = float("-inf")
    cfg = [(1 / 0.6, v, 0.95, False), (1 / 0.6, 50, 1.0, False), (1 / 0.6, 50, 0.95, False), (1.0, v, 1.0, True)]
    modes = []
    (tok, st), want = run_both(x, torch.float32, cfg, modes, chunk=chunk, cap=cap, capb=capb)
    assert_same((tok, st), want)
    assert bool(((tok >= 0) & (tok < v)).all())
    assert {0, 2} <= set(modes[0].tolist()) and bool((modes[0] >= 3).any())  # greedy, candidates, a full-row path
