"""verify.py: greedy verification exactly, speculative rejection sampling statistically (it must reproduce the
target distribution; a classic biased variant must fail the same test), sampling filters against HF's warpers."""

import math

import pytest
import torch

from sparsespec_compile.runtime import verify
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.kernels import sampling_reference as ref
from sparsespec_compile.runtime.verify import (Drafts, PositionSeed, SamplingTensors, greedy_verify, make_generator,
                                               probs_from_logits, rejection_sample, sample)


def onehot_logits(tokens, V=10):
    """[N, S] target tokens -> [N, S, V] logits whose argmax is that token."""
    t = torch.tensor(tokens)
    return torch.nn.functional.one_hot(t, V).float() * 5 + torch.randn(*t.shape, V) * 0.1


@pytest.mark.parametrize("drafts, target, accepted, out", [
    ([1, 2, 3], [1, 2, 3, 4], 3, [1, 2, 3, 4]),  # all accepted + bonus
    ([1, 2, 3], [5, 2, 3, 4], 0, [5, -1, -1, -1]),  # first rejected: target's token
    ([1, 2, 3], [1, 7, 3, 4], 1, [1, 7, -1, -1]),  # later matches after a mismatch do not count
    ([1, 2, 3], [1, 2, 9, 4], 2, [1, 2, 9, -1]),
])
def test_greedy_verify_exact(drafts, target, accepted, out):
    a, o = greedy_verify(torch.tensor([drafts]), onehot_logits([target]))
    assert a.tolist() == [accepted] and o.tolist() == [out]


def test_greedy_verify_batch_num_drafts_and_ties():
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 4, 4]])
    logits = onehot_logits([[1, 2, 3, 4], [1, 2, 3, 4], [4, 4, 4, 4]])
    a, o = greedy_verify(drafts, logits, num_drafts=torch.tensor([3, 1, 0]))
    # row 1 has 1 real draft: slot 1 is padding, never accepted; its token is the bonus after d1
    assert a.tolist() == [3, 1, 0] and o.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1], [4, -1, -1, -1]]
    tie = torch.zeros(1, 2, 10)  # all tied: argmax is the first index, as torch.argmax / HF greedy
    assert greedy_verify(torch.tensor([[0]]), tie)[1].tolist() == [[0, 0]]


def test_rejection_sample_greedy_rows_equal_greedy_verify():
    torch.manual_seed(0)
    N, k, V = 64, 4, 6
    target = torch.randn(N, k + 1, V) * 3
    draft_logits = target[:, :k] + torch.randn(N, k, V) * 2
    params = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=0.7) for i in range(N)]
    d, q = sample(draft_logits.reshape(N * k, V), [p for p in params for _ in range(k)])
    a, o = rejection_sample(d.view(N, k), Drafts.dense(draft_logits, q.view(N, k, -1)), target, params,
                            generator=make_generator(1, "cpu"))
    d = d.view(N, k)
    ga, go = greedy_verify(d, target)
    g = torch.arange(N) % 2 == 1
    assert torch.equal(a[g], ga[g]) and torch.equal(o[g], go[g])
    assert 0 < a[~g].float().mean() < k  # sampled rows do accept and reject some


def reference_probs(logits_row, temperature, top_k, top_p):
    """HF's LogitsWarpers (temperature -> top-k -> top-p), the behaviour the filters must reproduce."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    x = logits_row.view(1, -1).clone()
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.softmax(-1)[0]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.6, 0, 0.9), (1.3, 5, 1.0), (0.8, 6, 0.8)])
def test_filters_match_hf_warpers(temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(16, 3, 50) * 2
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    got = probs_from_logits(logits, SamplingTensors.build(p, 16, 50, "cpu"))
    want = torch.stack([torch.stack([reference_probs(logits[i, s], temperature, top_k, top_p) for s in range(3)])
                        for i in range(16)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_mixed_rows_each_get_their_own_filters():
    torch.manual_seed(2)
    cfg = [(0.0, 0, 1.0), (0.7, 5, 1.0), (1.2, 0, 0.8), (0.9, 3, 0.7), (1.0, 0, 1.0)]
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in cfg]
    logits = torch.randn(5, 30) * 2
    for rows in (params, params[1:4:2]):  # mixed (full sort) and all-top-k (topk path)
        idx = [params.index(p) for p in rows]
        got = probs_from_logits(logits[idx], SamplingTensors.build(rows, len(rows), 30, "cpu"))
        for r, i in enumerate(idx):
            t, k, p = cfg[i]
            want = (torch.nn.functional.one_hot(logits[i].argmax(), 30).float() if t == 0
                    else reference_probs(logits[i], t, k, p))
            torch.testing.assert_close(got[r], want, atol=1e-6, rtol=1e-5)


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x) = 1 - regularized lower gamma P(df/2, x/2), by its power series (fine for small df)."""
    a, z = df / 2, x / 2
    term = total = 1.0 / a
    n = 0
    while term > 1e-17 * total:
        n += 1
        term *= z / (a + n)
        total += term
    return max(0.0, 1.0 - math.exp(a * math.log(z) - z - math.lgamma(a)) * total) if z > 0 else 1.0


def goodness_of_fit(samples: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """(chi-square p-value, total-variation distance) of integer samples against distribution p."""
    n = samples.numel()
    counts = torch.bincount(samples, minlength=p.numel()).double()
    p = p.double()
    assert counts[p == 0].sum() == 0, "sampled a token of probability 0"
    nz = p > 0
    assert int(nz.sum()) >= 2, "degenerate distribution: nothing to test"
    stat = ((counts[nz] - n * p[nz]) ** 2 / (n * p[nz])).sum().item()
    return chi2_sf(stat, int(nz.sum()) - 1), 0.5 * (counts / n - p).abs().sum().item()


def test_chi2_sf_known_values():
    assert abs(chi2_sf(14.067, 7) - 0.05) < 1e-3 and abs(chi2_sf(18.475, 7) - 0.01) < 1e-4
    assert abs(chi2_sf(6.635, 1) - 0.01) < 1e-4


N_SAMPLES = 200_000


def run_speculative(params: SamplingParams, seed=0, k=3, V=8, num_drafts=None, target=None, draft=None):
    """One fixed target (per slot) and a deliberately different draft; N_SAMPLES independent cycles."""
    g = torch.Generator().manual_seed(1234)
    if target is None:
        target = torch.randn(k + 1, V, generator=g) * 1.5  # [k+1, V]; independent of the prefix: p_i fixed per slot
        draft = target[:k] + torch.randn(k, V, generator=g) * 1.5  # [k, V] q far from p: ~half the drafts rejected
    k, V = draft.shape
    gen = make_generator(seed, "cpu")
    d, q = sample(draft.repeat(N_SAMPLES, 1), params, generator=gen)  # [N*k], stats [N*k, 5]
    drafts = Drafts(draft, q.view(N_SAMPLES, k, -1)[0], torch.arange(k).expand(N_SAMPLES, k))  # rows by index
    a, out = rejection_sample(d.view(N_SAMPLES, k), drafts, target, params, generator=gen, num_drafts=num_drafts,
                              target_index=torch.arange(k + 1).expand(N_SAMPLES, k + 1))
    st = SamplingTensors.build(params, 1, V, "cpu")
    return a, out, probs_from_logits(target[None], st)[0], probs_from_logits(draft[None], st)[0]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.6, top_k=6, top_p=0.9)])
def test_rejection_sampling_reproduces_target_distribution(params):
    a, out, p, q = run_speculative(params)
    # Slot i is emitted in every cycle that accepted >= i drafts; there it must be distributed as p_i.
    for i in range(out.shape[1]):
        rows = a >= i
        pval, tv = goodness_of_fit(out[rows, i], p[i])
        # p > 1e-6: a correct sampler fails with probability 1e-6 (the seed is fixed, so the test is deterministic)
        assert pval > 1e-6 and tv < 0.01, (i, pval, tv, int(rows.sum()))
    # and the acceptance rate of the first draft is its theoretical value sum_x min(p_1, q_1)
    assert abs((a >= 1).double().mean().item() - torch.minimum(p[0], q[0]).sum().item()) < 0.005


def test_biased_rule_fails_the_same_test(monkeypatch):
    """Resampling a rejected slot from p instead of max(p - q, 0) (a classic bug) over-weights tokens the draft
    already likes: the goodness-of-fit test above must catch it by a wide margin."""
    def from_p(t, ts, d, ds, it, seeds):  # the race over p, ignoring q
        p = ref.row_probs(t.float() * it.unsqueeze(-1), ts)
        return (p / -ref.uniform(seeds, torch.arange(p.shape[-1]).expand_as(p)).log()).argmax(-1)

    monkeypatch.setattr(ref, "residual_reference", from_p)
    a, out, p, q = run_speculative(SamplingParams(temperature=1.0))
    pval, tv = goodness_of_fit(out[:, 0], p[0])
    assert pval < 1e-30 and tv > 0.02, (pval, tv)


def test_padded_slots_emit_the_bonus_distribution():
    """Rows with j < k drafts: slot j is the bonus ~ p_{j+1}, never a residual against a padded draft."""
    k = 3
    nd = torch.arange(N_SAMPLES) % (k + 1)  # 0..3 drafts
    a, out, p, q = run_speculative(SamplingParams(temperature=1.0), num_drafts=nd)
    assert (a <= nd).all()
    for j in range(k + 1):
        rows = (nd == j) & (a == j)  # all j drafts accepted -> slot j is the bonus from p_{j+1}
        pval, tv = goodness_of_fit(out[rows, j], p[j])
        assert pval > 1e-6 and tv < 0.02, (j, pval, tv)


def test_sample_matches_filtered_distribution_and_is_seeded_per_row():
    V = 8
    logits = torch.randn(V, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9)
    toks, stats = sample(logits.expand(N_SAMPLES, V), params, generator=make_generator(0, "cpu"))
    want = reference_probs(logits, 0.7, 6, 0.9)
    assert 3 <= int((want > 0).sum()) < V  # the filters bite, and enough tokens remain to test
    torch.testing.assert_close(stats[0, 3], want[toks[0]], atol=1e-6, rtol=1e-5)  # p(token) of the drawn token
    pval, tv = goodness_of_fit(toks, want)
    assert pval > 1e-6 and tv < 0.01
    # a seeded row's draws depend only on its own seed and logits, not on its neighbours
    ps = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0)]
    runs = []
    for other in (0, 1):
        x = torch.randn(2, 50, generator=torch.Generator().manual_seed(other))  # row 1 differs between runs
        x[0] = torch.linspace(-1, 1, 50)
        runs.append([sample(x, ps, [PositionSeed(7, pos), None])[0][0].item() for pos in range(4)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1  # fixed per position, different across positions


def test_params_count_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="3 SamplingParams for 2 rows"):
        sample(torch.randn(2, 5), [SamplingParams()] * 3)


def test_sampling_tensors_of_one_params_are_built_once_per_shape():
    """A sampled speculative step builds them for its drafts and its verification: four torch.full launches each
    time before the cache. Same values and shape -> the same (read-only) tensors; anything else -> its own."""
    from sparsespec_compile.runtime.verify import _as_tensors

    a = _as_tensors(SamplingParams(temperature=0.6, top_p=0.9), 5, 11, "cpu")
    assert _as_tensors(SamplingParams(temperature=0.6, top_p=0.9, seed=3), 5, 11, "cpu") is a  # no seed in them
    assert _as_tensors(SamplingParams(temperature=0.7, top_p=0.9), 5, 11, "cpu") is not a
    assert _as_tensors(SamplingParams(temperature=0.6, top_p=0.9), 4, 11, "cpu") is not a
    assert torch.equal(a.inv_temp, torch.full((5,), 1 / 0.6)) and torch.equal(a.top_p, torch.full((5,), 0.9))
