"""Sampling kernels against their torch reference (kernels/sampling_reference.py): the same noise, so the same
tokens, and the same kept-set statistics; the reference's distribution is tested statistically in
tests/runtime/test_sampler_distribution.py."""

import pytest
import torch

from sparsespec_compile.kernels import sampling_reference as ref
from sparsespec_compile.kernels.sampling_triton import residual, sample_rows
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.verify import Drafts, rejection_sample, sample

V = 203  # odd: the last block is partial


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


def run_both(x, dtype):
    rows, cfg = [], []
    for i in range(x.shape[0]):
        for c in CONFIGS:
            rows.append(i)
            cfg.append(c)
    r = torch.tensor(rows)
    it, tk, tp, gr = (torch.tensor(v) for v in zip(*cfg))
    it, tp = it.float(), tp.float()
    seeds = torch.randint(0, 1 << 62, (len(rows),), generator=torch.Generator().manual_seed(3))
    xd = x.to(dtype)
    got = sample_rows(xd, r, it, tk, tp, gr, seeds)
    want = ref.sample_rows_reference(xd[r], it, tk, tp, gr, seeds)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference_on_hard_rows(dtype):
    x = hard_rows(torch.Generator().manual_seed(0))
    if dtype == torch.float16:  # (half the rows: the interpreter runs one program at a time)
        x = x[[0, 1, 3, 4, 5, 7]].clamp(-6e4, 6e4)
    (tok, st), (tok_r, st_r) = run_both(x, dtype)
    assert torch.equal(tok, tok_r)
    torch.testing.assert_close(st[:, :2], st_r[:, :2], rtol=0, atol=0)  # max and threshold: exact present values
    torch.testing.assert_close(st[:, 2:], st_r[:, 2:], rtol=1e-5, atol=1e-6)  # sums: summation order differs


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


def test_rows_without_stats_stop_early_with_the_same_token():
    x = hard_rows(torch.Generator().manual_seed(5))[[0, 1, 3, 5, 9, 10]]
    n = x.shape[0]
    cfg = [(1 / 0.6, V, 0.95), (1.0, 20, 1.0), (2.0, 20, 0.8)]
    r = torch.arange(n).repeat_interleave(len(cfg))
    it, tk, tp = (torch.tensor([c[i] for c in cfg] * n) for i in range(3))
    it, tp = it.float(), tp.float()
    gr = torch.zeros(r.shape[0], dtype=torch.bool)
    seeds = torch.randint(0, 1 << 62, r.shape, generator=torch.Generator().manual_seed(6))
    tok, st = sample_rows(x, r, it, tk, tp, gr, seeds, need_stats=torch.zeros_like(gr))
    tok_r, st_r = ref.sample_rows_reference(x[r], it, tk, tp, gr, seeds)
    assert torch.equal(tok, tok_r)
    early = st[:, 1].isnan()
    assert early.any()  # some rows stopped early: their stats say so instead of holding a wrong number
    assert torch.equal(st[~early, 1], st_r[~early, 1])
