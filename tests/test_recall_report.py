"""The benchmark's recall-vs-acceptance figure (sparsespec_compile/benchmark/recall.py): Pearson's r over requests
(mean recall vs mean accepted per full cycle) and over cycles (a verification's recall vs the next cycle)."""

import pytest

from sparsespec_compile.benchmark.recall import pearson, recall_vs_acceptance


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2], [1, 2]) is None and pearson([1, 1, 1], [1, 2, 3]) is None


def test_pairs_a_verification_with_the_next_cycle():
    # cycle i's recall drafts cycle i + 1: high recall before full acceptance, low before rejections
    m = [{"recall": [0.9, 0.2, 0.9, 0.2], "accepted": [4, 4, 0, 4], "drafted": [4, 4, 4, 4]},
         {"recall": [0.5, 0.5, 0.5], "accepted": [2, 2, 2], "drafted": [4, 4, 4]},
         {"recall": [0.1], "accepted": [0], "drafted": [4]}]
    r = recall_vs_acceptance(m, stride=4)
    assert r["cycles"] == 5 and r["over_cycles"] > 0.9
    assert r["requests"] == 3 and r["over_requests"] > 0.9
    assert recall_vs_acceptance([{"recall": [], "accepted": [1], "drafted": [4]}], stride=4) is None
