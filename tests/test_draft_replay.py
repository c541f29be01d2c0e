"""bench/draft_replay.py's successor ranking (a replay-only experiment: a position ranks by the best verify score
among it and the ``reach`` positions before it), and kernels/hybrid.draft_sets, the one selection path the runtime
and the replay share, equal to PillarAttn's selection without a split."""

import torch

from bench.draft_replay import successor_scores
from sparsespec_compile import kernels
from sparsespec_compile.kernels.hybrid import draft_sets


def test_a_peak_carries_to_its_successors_only():
    s = torch.full((1, 1, 12), 0.25)
    s[..., 3] = 0.5
    s[..., 10:] = float("-inf")  # past the context
    key = successor_scores(s, 2)
    assert key[0, 0, 3:6].tolist() == [0.5] * 3  # the peak and its two successors
    assert key[0, 0, 2].item() == 0.25 and key[0, 0, 6].item() == 0.25  # not its predecessor, not past the reach
    assert torch.isneginf(key[..., 10:]).all()  # a successor past the context stays out
    assert torch.equal(successor_scores(s, 0), s)


def test_draft_sets_without_a_split_is_pillar_attn_and_ranks_successors_when_asked():
    N, budget = 40, 6
    s = torch.rand(2, 3, N, generator=torch.Generator().manual_seed(0)) * 0.01
    s[..., 10] = 1.0  # every head looked at position 10
    c, b = torch.tensor([N, N]), torch.tensor([budget, budget])
    plain, plain_len, _ = draft_sets(s[None], c, b, recent=1, split=None, max_budget=8, impl="reference")
    ref = kernels.select_pillars(s, c, b, recent=1, max_budget=8, impl="reference")
    assert torch.equal(plain[0], ref[0]) and torch.equal(plain_len, ref[1])
    idx, lengths, _ = draft_sets(successor_scores(s, 3)[None], c, b, recent=1, split=None, max_budget=8,
                                 impl="reference")
    assert lengths.tolist() == [budget, budget]
    for row in idx[0].flatten(0, 1):
        assert set(range(10, 14)) <= set(row[:budget].tolist())  # the peak and its 3 successors
        assert N - 1 in row[:budget].tolist()  # the newest, forced
