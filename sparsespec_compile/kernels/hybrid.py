"""The hybrid draft's split (``draft="hybrid"``) and the draft-recall telemetry, both read off the pillar scores.

A hybrid draft set of ``b`` keys per (request, layer, KV head) is ``S`` attention sinks (the first positions), the
``W`` newest positions (the recent window) and ``b - S - W`` pillars (the best of the rest by the last verification's
scores): the select of :func:`select_pillars` with the sinks and the window forced. Why both: on SmolLM2 (H200, 512
GSM8K requests) PillarAttn won on novel text (6.67 vs 4.73 of 8 accepted) and the window inside repeated text (6.49
vs 3.92), where the drafts' attention moves on past the tokens the verify queries looked at.

The split follows where the verify queries' attention fell, from the scores already computed (no pass over the KV):
``w = mass in the newest b - S positions / mass outside the sinks``, summed over a *group* of (layer, head) rows —
the whole request (one split per request), or each layer — and ``W = max(recent, round(w * (b - S)))``. Text the
model copies from nearby puts its mass in the window (``w -> 1``: the window draft); attention on far tokens moves
the budget to pillars. A fixed share in [0, 1] is the test and sweep handle: 0 is exactly the pillar draft (no sinks,
``recent`` newest), 1 exactly the streaming draft (``min(4, b)`` sinks + the newest ``b - 4``).

Everything here is device tensor arithmetic with shapes fixed by the step (CUDA-graph capturable, no host sync).
"""

from __future__ import annotations

import torch

from ._validate import check_impl, check_tensor

SINKS = 4  # attention sinks of the hybrid and streaming drafts (StreamingLLM / MagicDec use 4)


def draft_mass(scores: torch.Tensor, ctx_lens: torch.Tensor, budget: torch.Tensor, sinks: int = SINKS,
               impl: str = "triton") -> torch.Tensor:
    """Where the verify queries' attention fell, per (row, KV head): ``[Rv, Hkv, 3]`` fp32 of (mass on the first
    ``min(sinks, b)`` positions, mass on the newest ``b - min(sinks, b)`` positions after them, mass on all positions
    ``< ctx``), ``b = min(budget, ctx)``, ``ctx = min(ctx_lens, N)``; ``scores: [Rv, Hkv, N]`` from
    :func:`pillar_scores` (-inf past ``ctx``)."""
    check_tensor("scores", scores, ndim=3, dtypes=(torch.float32,))
    for name, t in (("ctx_lens", ctx_lens), ("budget", budget)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32, torch.int64), device=scores.device)
        if t.shape[0] != scores.shape[0]:
            raise ValueError(f"{name} must have Rv = {scores.shape[0]} entries, got {t.shape[0]}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    check_impl(impl, scores)
    if impl == "reference":
        return draft_mass_reference(scores, ctx_lens, budget, sinks)
    from .hybrid_triton import draft_mass_triton

    return draft_mass_triton(scores, ctx_lens, budget, sinks)


def draft_mass_reference(scores, ctx_lens, budget, sinks):
    Rv, H, N = scores.shape
    pos = torch.arange(N, device=scores.device)
    ctx = ctx_lens.long().clamp(max=N)
    b = torch.minimum(budget.long(), ctx).clamp(min=0)
    s_n = b.clamp(max=sinks)
    valid = pos[None, :] < ctx[:, None]  # [Rv, N]
    sink = valid & (pos[None, :] < s_n[:, None])
    window = valid & ~sink & (pos[None, :] >= (ctx - (b - s_n))[:, None])
    s = torch.where(valid[:, None, :], scores.float(), 0.0).nan_to_num(nan=0.0, posinf=0.0)
    return torch.stack([(s * m[:, None, :]).sum(-1) for m in (sink, window, valid)], dim=-1)


def hybrid_split(mass: torch.Tensor, ctx_lens: torch.Tensor, budget: torch.Tensor, recent: int,
                 share: float | str, sinks: int = SINKS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(window, sinks)``: ``[L, Rv, Hkv]`` int32 newest / first positions forced per (layer, row, head) for
    :func:`select_pillars`, from ``mass: [L, Rv, Hkv, 3]`` (:func:`draft_mass`) and the rows' ``ctx_lens, budget:
    [Rv]``. ``share``: "request" (one window share per row, from the mass of all its layers and heads), "layer" (per
    row and layer) or a fixed number in [0, 1] (0: the pillar draft, 1: the streaming draft)."""
    L, Rv, H, _ = mass.shape
    b = torch.minimum(budget.long(), ctx_lens.long()).clamp(min=0)[None, :, None]  # [1, Rv, 1]
    if isinstance(share, str):
        dims = {"request": (0, 2), "layer": (2,)}[share]
        m = mass.sum(dim=dims, keepdim=True)  # sums over the group, then one share for the group
        w = (m[..., 1] / (m[..., 2] - m[..., 0]).clamp(min=1e-12)).clamp(0.0, 1.0).expand(L, Rv, H)
    else:
        w = torch.full((L, Rv, H), float(share), device=mass.device)
    if not isinstance(share, str) and float(share) <= 0.0:  # exactly the pillar draft: no sinks, the `recent` newest
        return b.clamp(max=recent).expand(L, Rv, H).to(torch.int32), torch.zeros(L, Rv, H, dtype=torch.int32,
                                                                                device=mass.device)
    s_n = b.clamp(max=sinks)
    free = b - s_n
    window = torch.maximum(torch.round(w * free).long(), free.clamp(max=recent)).clamp(max=free)
    return window.to(torch.int32), s_n.expand(L, Rv, H).to(torch.int32)


def draft_recall(scores: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor,
                 ctx_mass: torch.Tensor) -> torch.Tensor:
    """Share of the verify queries' attention the next draft keeps, per (row, KV head): ``[Rv, Hkv]`` fp32.

    The next draft attends its set (``indices[..., :lengths]``, positions ``< ctx``) and every position ``>= ctx``
    (the dense tail), so what it loses of the verify queries' attention is the context mass outside the set:
    ``recall = 1 - (ctx_mass - mass on the set)``, 1.0 exactly when the set covers the context. ``scores: [Rv, Hkv,
    N]``, ``indices: [Rv, Hkv, B]``, ``lengths: [Rv]``, ``ctx_mass: [Rv, Hkv]`` (:func:`draft_mass`'s last column).
    A gather of ``B`` scores per row: no pass over the KV or the scores."""
    B, N = indices.shape[-1], scores.shape[-1]
    idx = indices.long().clamp(0, max(N - 1, 0))
    keep = torch.arange(B, device=indices.device)[None, None, :] < lengths.long()[:, None, None]
    got = torch.where(keep, scores.gather(-1, idx), 0.0).nan_to_num(nan=0.0, neginf=0.0, posinf=0.0).sum(-1)
    return (1.0 - (ctx_mass - got)).clamp(0.0, 1.0)


def draft_sets(scores: torch.Tensor, ctx_lens: torch.Tensor, budget: torch.Tensor, recent: int,
               split: float | str | None, max_budget: int, impl: str = "triton", need_mass: bool = False):
    """The next draft sets of scored rows from every layer's scores, ``scores: [L, Rv, Hkv, N]``; ``ctx_lens,
    budget: [Rv]``. ``split`` None: PillarAttn's top-B (the ``recent`` newest forced); else the hybrid split
    (:func:`hybrid_split`). Returns ``(indices [L, Rv, Hkv, max_budget], lengths [Rv], mass)``, ``mass``
    (:func:`draft_mass`, ``[L * Rv, Hkv, 3]``) when the split needed it or ``need_mass``, else None. The one
    selection path of the runtime (ops.py) and of the CPU replay (bench/draft_replay.py)."""
    from .pillars import select_pillars

    L, Rv, H, N = scores.shape
    flat = scores.reshape(L * Rv, H, N)
    lens_l, budget_l = ctx_lens.repeat(L), budget.repeat(L)  # every layer's rows back to back
    mass = draft_mass(flat, lens_l, budget_l, impl=impl) if split is not None or need_mass else None
    kw = {"recent": recent}
    if split is not None:
        window, sinks = hybrid_split(mass.view(L, Rv, H, 3), ctx_lens, budget, recent, split)
        kw = dict(recent=window.view(L * Rv, H), sinks=sinks.view(L * Rv, H))
    idx, lengths = select_pillars(flat, lens_l, budget_l, max_budget=max_budget, impl=impl, **kw)
    return idx.view(L, Rv, H, -1), lengths[:Rv], mass
