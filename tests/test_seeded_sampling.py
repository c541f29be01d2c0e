"""Seeded sampling is reproducible per request whatever else is batched, under speculation too (issue 15.4).

Before: at stride 4 only 1-2 of 10 seeded requests batched together equalled their solo runs (a request's draws
depended on the batch's drafts per cycle and its draft distributions on its verify schedule)."""

from __future__ import annotations

import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.verify import Drafts, PositionSeed, rejection_sample, sample
from sparsespec_compile.testing import FAMILIES, tiny_model


def test_batched_seeded_requests_equal_their_solo_runs():
    model = tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2), "sdpa", seed=0)
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=4, adaptive=False, min_budget=4, recent=1,
                                      page_size=4, num_pages=160, max_num_seqs=8))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 96, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (8,), generator=g)]
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=123, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    solo = [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
    assert sum(a == b for a, b in zip(batched, solo)) == len(prompts), (batched, solo)
    assert llm.stats()["cycles"] > 0  # speculation really ran


def test_coupled_verification_emits_the_targets_own_sample():
    """Gumbel-max coupling: whatever the drafts, the emitted token at a position is what sampling the target
    alone with that position's noise gives; drafts sampled with the same noise are accepted often."""
    n, k, vocab = 400, 3, 11
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(n, k + 1, vocab, generator=gen) * 2
    draft_logits = target[:, :k] + 0.5 * torch.randn(n, k, vocab, generator=gen)  # a close, imperfect draft
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1)
    seeds = [PositionSeed(seed, 5) for seed in range(n)]
    drafts, stats = [], []
    for s in range(k):  # draft slot s samples output position 5 + s
        d, q = sample(draft_logits[:, s], params, [PositionSeed(x.seed, x.position + s) for x in seeds])
        drafts.append(d)
        stats.append(q)
    kept = Drafts.dense(draft_logits, torch.stack(stats, 1))
    accepted, tokens = rejection_sample(torch.stack(drafts, 1), kept, target, params, seeds)
    own = torch.stack([sample(target[:, s], params, [PositionSeed(x.seed, x.position + s) for x in seeds])[0]
                       for s in range(k + 1)], 1)  # [N, k+1] the target's samples, no drafts involved
    rows = torch.arange(n)
    assert torch.equal(tokens[rows, accepted], own[rows, accepted])
    for a in range(1, k + 1):  # accepted drafts are the target's samples too
        kept = accepted >= a
        assert torch.equal(tokens[kept, a - 1], own[kept, a - 1])
    assert accepted.float().mean() > 0.5  # coupling works: the drafts often are the target's samples


def test_position_seed_samples_follow_the_distribution():
    """The race winner over many seeds is distributed as p (chi-square, 6 degrees of freedom)."""
    probs = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02])
    n = 4000
    logits = probs.log().expand(n, -1)
    tok, _ = sample(logits, SamplingParams(temperature=1.0, seed=0), [PositionSeed(s, 0) for s in range(n)])
    counts = torch.bincount(tok, minlength=len(probs)).float()
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum().item()
    assert chi2 < 22.5  # p = 0.001 for 6 degrees of freedom
