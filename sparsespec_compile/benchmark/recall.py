"""How well draft recall predicts acceptance: Pearson correlations over the requests and over the cycles of a run.

Draft recall (kernels/hybrid.py ``draft_recall``) is measured at each scored verification: the share of the verify
queries' attention inside the key set the *next* cycle drafts with. So a cycle's recall is paired with the next
cycle's accepted drafts; per request, its mean recall with its mean accepted drafts per full cycle.
"""

from __future__ import annotations

import math


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r, or None with fewer than 3 pairs or no spread in either."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    n = len(pairs)
    if n < 3:
        return None
    mx, my = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx <= 0 or syy <= 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pairs) / math.sqrt(sxx * syy)


def recall_vs_acceptance(metrics: list[dict], stride: int) -> dict | None:
    """``{"over_requests": r, "requests": n, "over_cycles": r, "cycles": n}`` from the requests' metrics (``recall``
    per scored verification, ``accepted`` / ``drafted`` per cycle); None when nothing was scored (streaming, full)."""
    req_recall, req_acc, cyc_recall, cyc_acc = [], [], [], []
    for m in metrics:
        recall, acc, drafted = m.get("recall") or [], m.get("accepted") or [], m.get("drafted") or []
        if not recall:
            continue
        full = [a for a, d in zip(acc, drafted) if d == stride]
        if full:
            req_recall.append(sum(recall) / len(recall))
            req_acc.append(sum(full) / len(full))
        if len(recall) == len(acc):  # every verification scored (a fixed stride): recall i drafts cycle i + 1
            for r, a, d in zip(recall, acc[1:], drafted[1:]):
                if d == stride:
                    cyc_recall.append(r)
                    cyc_acc.append(a)
    if not req_recall and not cyc_recall:
        return None
    return {"over_requests": pearson(req_recall, req_acc), "requests": len(req_recall),
            "over_cycles": pearson(cyc_recall, cyc_acc), "cycles": len(cyc_recall)}
