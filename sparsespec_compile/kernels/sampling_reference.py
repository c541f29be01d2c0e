"""Pure-PyTorch reference of the sampling kernels (sampling_triton.py): the test oracle and the CPU path.

Both define the same distribution and draw the same noise, so on equal inputs they return the same tokens.

The kept set of a sampled row (temperature T, top-k, top-p, HF's order) is a threshold on its scaled logits
``l = x / T``: ``S = {x : l_x >= tau}``. ``tau_k`` is the k-th largest ``l`` (ties at it are kept, as HF's top-k);
``tau`` the largest value whose upper set holds at least ``top_p`` of the top-k set's mass. That is HF's top-p
(drop a token once the tokens ranked above it reach ``top_p``) with one difference on exact ties at the cut: a sort
keeps some of the tied tokens, a threshold keeps all of them, so the result does not depend on a sort's tie order.
The row is then ``p(x) = [l_x >= tau] exp(l_x - m) / z`` with ``m = max l`` and ``z = sum_{l >= tau} exp(l - m)``,
which is what ``stats`` carries: ``(m, tau, z, p(token), u)`` per row, ``u`` the row's uniform at counter V (the
acceptance test of speculative verification).

Noise is a counter hash of (row seed, vocabulary index) (``uniform``): the token of a row depends on its seed and its
logits only, never on its neighbours, and the Triton kernel regenerates it in every pass instead of reading it.
Sampling is the Gumbel race ``argmax_{x in S} l_x - log E_x`` with ``E = -log U`` (exactly ``x ~ p``).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32): in two 16-bit halves of c, so no product overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Wellons), on int64 tensors holding uint32 values: a bijection of [0, 2**32) with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_key(seeds: torch.Tensor) -> torch.Tensor:
    """int64 seeds [...] (>= 0) -> 32-bit stream keys [...] (int64): both halves of the seed matter."""
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32
    return mix32(lo ^ mix32(hi ^ _GOLDEN))


def uniform(seeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """U(0, 1) noise (float32) of each row seed [R] at counters ``index`` [R, C]: the midpoint (2j + 1) / 2**24 of one
    of 2**23 equal bins, j the hash's top 23 bits. Every value is exact in float32 (an odd integer below 2**24 times a
    power of two), so U lies in [2**-24, 1 - 2**-24] and E = -log U > 0 is finite: no race key is infinite.

    (It was ``((h >> 8) + 0.5) * 2**-24``: 2**24 - 1 + 0.5 is not a float32 and rounds to 2**24, so one hash in 2**24
    gave U = 1.0 exactly, E = -0.0 or +0.0 (as the compiler negates), and a race key +-inf or NaN: that token won
    or lost whatever its probability, in ~0.9% of the rows of a 151,936-token vocabulary. The residual's key w / E
    was -inf in torch and +inf in the kernel (``0 - log U``: +0.0), the H200 check's 1-in-64 residual mismatch.)"""
    h = mix32(mix32(index.long() & MASK32) ^ row_key(seeds).unsqueeze(-1))
    return ((h >> 8) | 1).float() * (1.0 / (1 << 24))


def thresholds(logits: torch.Tensor, inv_temp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               greedy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """logits [R, V], per-row inv_temp [R] f32, top_k [R] int (>= V: off), top_p [R] f32 (>= 1: off), greedy [R]
    bool -> (l [R, V] f32 scaled logits, m [R], tau [R], z [R]). Greedy rows: tau = m, z = 1 (their token is the
    argmax, their distribution one-hot)."""
    l = logits.float() * inv_temp.float().unsqueeze(-1)
    valid = l > float("-inf")
    m = l.max(-1).values
    sl = l.sort(-1, descending=True).values  # the oracle may sort; the kernel does not
    nvalid = valid.sum(-1)
    kk = torch.minimum(top_k.long(), nvalid).clamp_min(1)
    tau = sl.gather(-1, (kk - 1).unsqueeze(-1)).squeeze(-1)  # k-th largest (min valid when top-k is off)
    e = torch.where(valid, (l - m.unsqueeze(-1)).exp(), 0.0)
    zk = (e * (l >= tau.unsqueeze(-1))).sum(-1)
    es = torch.where(sl >= tau.unsqueeze(-1), (sl - m.unsqueeze(-1)).exp(), 0.0)
    reach = es.cumsum(-1) >= (top_p.float() * zk).unsqueeze(-1)
    tau_p = sl.gather(-1, reach.long().argmax(-1, keepdim=True)).squeeze(-1)  # first prefix reaching top_p
    # (no prefix reaches it only through rounding, top_p within ~1e-7 of 1: keep the top-k set)
    tau = torch.where((top_p < 1.0) & reach.any(-1), torch.maximum(tau, tau_p), tau)
    tau = torch.where(greedy, m, tau)
    z = torch.where(greedy, 1.0, (e * (l >= tau.unsqueeze(-1))).sum(-1))
    return l, m, tau, z


def sample_rows_reference(logits: torch.Tensor, inv_temp, top_k, top_p, greedy,
                          seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] -> (tokens [R] int64, stats [R, 5] f32 = (m, tau, z, p(token), u)); the kernel's contract."""
    l, m, tau, z = thresholds(logits, inv_temp, top_k, top_p, greedy)
    idx = torch.arange(l.shape[-1], device=l.device).expand_as(l)
    race = torch.where(l >= tau.unsqueeze(-1), l - (-uniform(seeds, idx).log()).log(), float("-inf"))
    tokens = torch.where(greedy, l.argmax(-1), race.argmax(-1))
    lt = l.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    pt = torch.where(greedy, 1.0, (lt - m).exp() / z)
    u = uniform(seeds, torch.full((l.shape[0], 1), l.shape[-1], device=l.device))[:, 0]
    return tokens, torch.stack([m, tau, z, pt, u], -1)


def row_probs(l: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Scaled logits [..., V] and their stats [..., >= 3] -> the row's distribution [..., V] (sampled rows)."""
    m, tau, z = (stats[..., i].unsqueeze(-1) for i in range(3))
    return torch.where(l >= tau, (l - m).exp() / z, 0.0)


def residual_reference(target_logits: torch.Tensor, target_stats: torch.Tensor, draft_logits: torch.Tensor,
                       draft_stats: torch.Tensor, inv_temp: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Rows [R, V] of target and draft logits with their stats [R, 5] -> tokens [R] ~ norm(max(p - q, 0)), or ~ p
    where that residual is all zero (p == q to rounding: rejection there had probability ~0)."""
    it = inv_temp.float().unsqueeze(-1)
    p = row_probs(target_logits.float() * it, target_stats)
    q = row_probs(draft_logits.float() * it, draft_stats)
    w = (p - q).clamp_min(0.0)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, p)
    idx = torch.arange(p.shape[-1], device=p.device).expand_as(p)
    return torch.where(w > 0, w / -uniform(seeds, idx).log(), -1.0).argmax(-1)  # (the kernel's keys: -1 where w is 0)


__all__ = ["mix32", "residual_reference", "row_key", "row_probs", "sample_rows_reference", "thresholds", "uniform"]
