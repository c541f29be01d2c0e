"""The sorting-free sampler (kernels/sampling_reference.py, which the Triton kernels match token for token:
tests/kernels/test_sampling_triton.py) draws exactly the target distribution, for plain samples and per draft slot
of speculative verification, for every filter and their combination, a top-p that keeps one token, ties and -inf;
a deliberately biased rule fails the same test; seeded rows reproduce whatever else is in the batch."""

import pytest
import torch

from sparsespec_compile.kernels import sampling_reference as ref
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.verify import Drafts, PositionSeed, make_generator, rejection_sample, sample
from sparsespec_compile.testing.sampling import goodness_of_fit, tv_noise

ALPHA = 1e-6
N = 60_000
INF = float("inf")


def exact(x: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The target distribution of one row [V], by its definition, tie group by tie group (no shared code with the
    sampler): temperature, then the top-k values (ties at the k-th kept), then the tie groups, best first, while the
    mass before them is below top_p of the top-k mass."""
    l = x.double() / temperature
    values = sorted({v for v in l.tolist() if v > -INF}, reverse=True)
    count = lambda v: int((l >= v).sum())  # noqa: E731
    keep = [v for v in values if top_k == 0 or count(v) - int((l == v).sum()) < top_k]
    w = torch.where(l > -INF, (l - l.max()).exp(), 0.0)
    zk = float(w[l >= keep[-1]].sum())
    kept, before = [], 0.0
    for v in keep:
        if before >= top_p * zk:
            break
        kept.append(v)
        before += float(w[l == v].sum())
    p = torch.where(l >= kept[-1], w, 0.0)
    return (p / p.sum()).float()


ROW = torch.tensor([2.0, 1.5, 1.5, 0.7, 0.2, 0.2, 0.2, -0.5, -1.0, -INF, -2.0, -INF])  # ties and -inf
CASES = {  # name: (temperature, top_k, top_p)
    "temperature": (0.7, 0, 1.0),
    "top_k": (1.0, 4, 1.0),  # 2, 1.5, 1.5, 0.7
    "top_k_cut_in_a_tie": (1.0, 5, 1.0),  # the 5th largest is one of three tied 0.2s: all three kept
    "top_p": (0.8, 0, 0.75),
    "top_p_cut_in_a_tie": (1.0, 0, 0.8),  # a sort would keep one of the three 0.2s, the threshold keeps all
    "combined": (1.3, 6, 0.8),
    "top_k_beyond_valid": (1.0, 11, 0.9),  # more than the 10 finite tokens
}


def check(samples: torch.Tensor, p: torch.Tensor, what: str) -> None:
    pval, tv = goodness_of_fit(samples, p)
    bound = 0.01 + 1.5 * tv_noise(p, samples.numel())
    assert pval > ALPHA and tv < bound, f"{what}: chi-square p {pval:.3g}, TV {tv:.4f} (bound {bound:.4f})"


@pytest.mark.parametrize("case", CASES)
def test_plain_samples_follow_the_target(case):
    t, k, p = CASES[case]
    want = exact(ROW, t, k, p)
    assert int((want > 0).sum()) >= 3
    toks, _ = sample(ROW.expand(N, -1), SamplingParams(temperature=t, top_k=k, top_p=p),
                     generator=make_generator(0, "cpu"))
    check(toks, want, case)


def test_top_p_keeping_one_token_and_a_tied_top():
    x = torch.tensor([0.0, 3.0, 1.0, -INF, 2.0])
    toks, st = sample(x.expand(2000, -1), SamplingParams(temperature=0.9, top_p=0.01), generator=make_generator(1, "cpu"))
    assert (toks == 1).all() and torch.allclose(st[:, 3], torch.ones(2000))
    x = torch.tensor([3.0, 0.0, 3.0, 1.0])  # the top is a tie: both tied tokens are the kept set, half each
    toks, _ = sample(x.expand(N, -1), SamplingParams(temperature=1.0, top_p=0.01), generator=make_generator(2, "cpu"))
    check(toks, torch.tensor([0.5, 0.0, 0.5, 0.0]), "tied top")


def speculative(params: SamplingParams, target: torch.Tensor, draft: torch.Tensor, seed: int = 0):
    """N independent cycles of one fixed target [k+1, V] and draft [k, V] (rows shared by index, not copied)."""
    k = draft.shape[0]
    gen = make_generator(seed, "cpu")
    d, q = sample(draft.repeat(N, 1), params, generator=gen)
    drafts = Drafts(draft, q.view(N, k, -1)[0], torch.arange(k).expand(N, k))
    return rejection_sample(d.view(N, k), drafts, target, params, generator=gen,
                            target_index=torch.arange(k + 1).expand(N, k + 1))


def slots(k: int = 3):
    g = torch.Generator().manual_seed(7)
    target = ROW + torch.cat([torch.randn(k + 1, 9, generator=g), torch.zeros(k + 1, 3)], 1).round(decimals=1)
    target[:, 9] = -INF
    draft = target[:k] + torch.randn(k, ROW.numel(), generator=g)  # -inf stays -inf: never drafted
    return target, draft


@pytest.mark.parametrize("case", ["temperature", "top_k_cut_in_a_tie", "top_p", "combined"])
def test_every_draft_slot_emits_the_target(case):
    t, k, p = CASES[case]
    target, draft = slots()
    accepted, out = speculative(SamplingParams(temperature=t, top_k=k, top_p=p), target, draft)
    for i in range(out.shape[1]):  # slot i is emitted by every cycle that accepted >= i drafts
        rows = accepted >= i
        check(out[rows, i], exact(target[i], t, k, p), f"{case} slot {i}")
    assert 0.2 < accepted.float().mean() < 2.8  # the drafts are neither always right nor always wrong


def test_a_biased_top_p_fails(monkeypatch):
    """Cutting the tie group that crosses top_p (keeping only groups whose mass ends below it): the same check must
    reject it."""
    orig = ref.thresholds

    def biased(logits, inv_temp, top_k, top_p, greedy):
        l, m, tau, z = orig(logits, inv_temp, top_k, top_p, greedy)
        above = torch.where(l > tau.unsqueeze(-1), l, INF).min(-1).values  # the next present value up
        tau = torch.where((top_p < 1) & (above < INF), above, tau)
        z = (torch.where(l >= tau.unsqueeze(-1), (l - m.unsqueeze(-1)).exp(), 0.0)).sum(-1)
        return l, m, tau, z

    monkeypatch.setattr(ref, "thresholds", biased)
    t, k, p = CASES["top_p"]
    toks, _ = sample(ROW.expand(N, -1), SamplingParams(temperature=t, top_p=p), generator=make_generator(0, "cpu"))
    pval, tv = goodness_of_fit(toks, exact(ROW, t, k, p))
    assert pval < 1e-30 and tv > 0.05, (pval, tv)


def test_seeded_rows_reproduce_whatever_else_is_in_the_batch():
    g = torch.Generator().manual_seed(3)
    n, k, v = 5, 3, 40
    target = torch.randn(n, k + 1, v, generator=g) * 2
    draft = target[:, :k] + torch.randn(n, k, v, generator=g)
    mine = SamplingParams(temperature=0.9, top_k=12, top_p=0.9, seed=11)
    others = [SamplingParams(), SamplingParams(temperature=1.3), SamplingParams(temperature=0.5, top_k=3, seed=2)]
    runs = []
    for batch in range(3):  # the seeded row 0 with different neighbours (and different neighbour logits)
        params = [mine] + [others[(batch + i) % 3] for i in range(n - 1)]
        t = target.clone()
        t[1:] += batch
        seeds = [PositionSeed(11, 40)] + [PositionSeed(2, 9) if p.seed else None for p in params[1:]]
        dseeds = [PositionSeed(s.seed, s.position + j) if s else None for s in seeds for j in range(k)]
        d, q = sample(draft.reshape(n * k, v), [p for p in params for _ in range(k)], dseeds)
        a, tokens = rejection_sample(d.view(n, k), Drafts.dense(draft, q.view(n, k, -1)), t, params, seeds)
        plain = sample(target[0], mine, [PositionSeed(11, 40 + j) for j in range(k + 1)])[0]
        runs.append((a[0].item(), tokens[0].tolist(), plain.tolist()))
    assert runs[0] == runs[1] == runs[2]
    a, tokens, plain = runs[0]
    assert tokens[: a + 1] == plain[: a + 1]  # what it emits is the target's own seeded sample at each position
