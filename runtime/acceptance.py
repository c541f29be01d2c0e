"""Decayed per-position acceptance of drafts (torch-free): what the adaptive stride predicts a cycle's tokens from.

Draft ``i`` (1-based) of a cycle is *judged* only when drafts ``1..i-1`` were accepted (greedy and rejection
sampling both stop at the first rejection), so the natural quantity is the conditional acceptance
``q_i = P(draft i accepted | drafts 1..i-1 accepted)``; a cycle of ``j`` drafts then yields in expectation
``1 + sum_{i<=j} prod_{m<=i} q_m`` tokens (the accepted drafts plus the bonus token).

Counts decay by ``decay`` per recorded cycle (0.8: a cycle 5 cycles ago weighs 0.33; at most 5 cycles of evidence),
so a request whose text turns hard (or easy) is followed within a few cycles. The estimate is smoothed towards a
prior (the population's acceptance, see stride_policy.py) with the weight of ``PRIOR_WEIGHT`` cycles, so one unlucky
cycle does not end speculation and a position never judged falls back to the prior. The weight is small against
the evidence on purpose: a request that never gets draft 1 accepted never has draft 2 judged, and its estimate of
``q_1`` must still fall far enough (0.5 * 0.8 / 5.5 = 0.07 at most) that the prior's optimism about the positions
behind it does not keep it speculating.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DECAY = 0.8
PRIOR_WEIGHT = 0.5


class AcceptanceStats:
    """Decayed ``judged[i]`` / ``accepted[i]`` counts of draft position ``i + 1``; grows with the longest cycle seen."""

    __slots__ = ("decay", "judged", "accepted", "cycles", "_counts")

    def __init__(self, decay: float = DECAY) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"AcceptanceStats.decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.judged: list[float] = []
        self.accepted: list[float] = []
        self.cycles = 0  # cycles recorded (undecayed)
        self._counts: tuple = (-1, 0, None)  # counts(n)'s last answer: (cycles, n, array)

    def counts(self, n: int) -> np.ndarray:
        """``judged`` then ``accepted``, each cut or padded with zeros to ``n``: one array, kept until the next
        recorded cycle (a request decoding plainly is priced again and again with no new record)."""
        at, size, row = self._counts
        if at != self.cycles or size != n:
            pad = [0.0] * n
            row = np.array((self.judged + pad)[:n] + (self.accepted + pad)[:n], dtype=np.float64)
            self._counts = (self.cycles, n, row)
        return row

    def record(self, drafted: int, accepted: int) -> None:
        """One verified cycle: ``drafted`` drafts, the first ``accepted`` of them accepted (0 <= accepted <= drafted)."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted ({accepted}) must be in [0, drafted={drafted}]")
        if drafted == 0:
            return  # a plain decode judges nothing
        if len(self.judged) < drafted:
            grow = drafted - len(self.judged)
            self.judged += [0.0] * grow
            self.accepted += [0.0] * grow
        d = self.decay
        # decayed, then +1 where judged / accepted, element by element as a loop would (the same floats), in two
        # comprehensions instead of four Python loops: the adaptive stride records every verify
        judged, acc, n = self.judged, self.accepted, min(accepted + 1, drafted)  # draft i+1 judged iff i accepted
        self.judged = [x * d + 1.0 for x in judged[:n]] + [x * d for x in judged[n:]]
        self.accepted = [x * d + 1.0 for x in acc[:accepted]] + [x * d for x in acc[accepted:]]
        self.cycles += 1

    def conditional(self, n: int, prior: Sequence[float], prior_weight: float = PRIOR_WEIGHT) -> list[float]:
        """``q_1..q_n``: smoothed conditional acceptance of each position (``prior[i]`` with weight ``prior_weight``)."""
        return conditional([self], n, prior, prior_weight)[0].tolist()


def conditional(stats: Sequence[AcceptanceStats], n: int, prior: Sequence[float],
                prior_weight: float = PRIOR_WEIGHT) -> np.ndarray:
    """``[len(stats), n]``: ``AcceptanceStats.conditional`` of each of ``stats`` (positions never judged count 0), as
    one array for the adaptive stride's batched pricing. Elementwise, so each entry is the same float as the scalar
    ``(hits + w * prior) / (judged + w)``."""
    counts = np.array([s.counts(n) for s in stats]).reshape(len(stats), 2 * n)
    judged, hits = counts[:, :n], counts[:, n:]
    return (hits + prior_weight * np.asarray(prior, dtype=np.float64)) / (judged + prior_weight)


def expected_tokens(q: list[float], j: int) -> float:
    """Expected tokens of a cycle of ``j`` drafts with conditional acceptances ``q``: 1 + sum of P(accepted >= i)."""
    total, p = 1.0, 1.0
    for i in range(j):
        p *= q[i]
        total += p
    return total


def per_position(accepted: list[int], drafted: list[int], n: int) -> list[float]:
    """Share of the cycles that drafted position ``i`` (1..n) in which it was accepted (None-free: 0.0 if none)."""
    out = []
    for i in range(1, n + 1):
        tried = sum(1 for d in drafted if d >= i)
        hit = sum(1 for a, d in zip(accepted, drafted) if d >= i and a >= i)
        out.append(hit / tried if tried else 0.0)
    return out
