"""Sampling and lossless speculative verification, on the device (no host sync: every decision is a tensor op,
and the branches taken on the host depend only on the ``SamplingParams``, never on tensor values).

Shapes: ``N`` rows (requests), ``k`` draft slots (rows with fewer drafts pass ``num_drafts``), ``V`` vocabulary.

Speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023), per row, with ``p_i``/``q_i`` the
target/draft distributions at draft slot ``i`` after the *same* temperature/top-k/top-p transform:

    for i in 1..j:   accept d_i with probability min(1, p_i(d_i) / q_i(d_i))
    first reject at i:  emit x ~ norm(max(p_i - q_i, 0))          (the residual)
    all j accepted:     emit the bonus x ~ p_{j+1}

Why it is lossless: P(emit x at slot i) = q_i(x)·min(1, p_i(x)/q_i(x)) + P(reject)·max(p_i(x)-q_i(x), 0)/Z
= min(q_i(x), p_i(x)) + max(p_i(x) - q_i(x), 0) = p_i(x), since Z = Σ max(p_i - q_i, 0) = P(reject).
Greedy rows are the special case with one-hot p and q: accept iff d_i == argmax p_i, emit argmax p_i.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from .host_copy import to_device
from .sampling_params import SamplingParams

def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own generator: its samples do not depend on what else shares the batch."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class PositionSeed:
    """The noise of a seeded request's row: output position ``position`` (``+ s`` for verify slot ``s``) always gets
    the same draws, from a generator seeded with (seed, position).

    A seeded request's generator stream cannot make it reproducible under speculation: how many draws a step takes
    (drafts per cycle, the phase a request is staggered to) and the draft distributions (pillars refreshed at each
    verify) depend on what else is batched. So seeded rows use noise keyed by position, and verify by Gumbel-max
    coupling (``rejection_sample``): the token emitted at a position is argmax(p / E) for that position's noise E,
    whatever the drafts were. Exact: E is fresh Exp(1) noise for each position, independent of the prefix.
    """

    seed: int
    position: int


_MASK64 = (1 << 64) - 1
_SEEDED: dict[torch.device, torch.Generator] = {}  # one reseeded generator per device


def _position_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    # splitmix64 of (seed, position): nearby positions and seeds get unrelated streams
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    g = _SEEDED.get(device)
    if g is None:
        g = _SEEDED[device] = torch.Generator(device=device)
    return g.manual_seed((z ^ (z >> 31)) >> 1)


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters on the device, plus host flags that pick the code path without a sync."""

    # Device tensors; None when every row is greedy (the argmax path reads none of them: no H2D copy per step).
    temperature: torch.Tensor | None  # [N] float32 (greedy rows hold 1.0: never divided by 0)
    top_k: torch.Tensor | None  # [N] int64, V where off
    top_p: torch.Tensor | None  # [N] float32
    greedy: torch.Tensor | None  # [N] bool
    any_greedy: bool
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    max_top_k: int  # > 0 when every sampled row has a top-k: filter within torch.topk(max_top_k), no full sort

    @classmethod
    def build(cls, params: SamplingParams | Sequence[SamplingParams], n: int, vocab: int,
              device: torch.device | str) -> "SamplingTensors":
        if isinstance(params, SamplingParams):  # one set for every row: no per-row Python work
            rows = [params]
            f = lambda xs, dt: torch.full((n,), xs[0], dtype=dt, device=device)  # noqa: E731
        else:
            rows = list(params)
            f = lambda xs, dt: to_device(xs, device, dt)  # noqa: E731
            if len(rows) != n:
                raise ValueError(f"got {len(rows)} SamplingParams for {n} rows")
        greedy = [p.greedy for p in rows]
        if all(greedy):
            return cls(None, None, None, None, any_greedy=True, all_greedy=True, use_top_k=False, use_top_p=False,
                       max_top_k=0)
        return cls(
            temperature=f([1.0 if g else p.temperature for p, g in zip(rows, greedy)], torch.float32),
            top_k=f([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in rows], torch.int64),
            top_p=f([p.top_p for p in rows], torch.float32),
            greedy=f(greedy, torch.bool),
            any_greedy=any(greedy), all_greedy=all(greedy),
            use_top_k=any(0 < p.top_k < vocab and not g for p, g in zip(rows, greedy)),
            use_top_p=any(p.top_p < 1.0 and not g for p, g in zip(rows, greedy)),
            max_top_k=max((p.top_k for p, g in zip(rows, greedy) if not g), default=0)
            if all(0 < p.top_k < vocab for p, g in zip(rows, greedy) if not g) else 0,
        )


def probs_from_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits: [N, V] or [N, S, V] -> float32 probabilities after temperature, top-k, top-p (HF's order).

    Greedy rows become one-hot at the argmax (first index on ties), which makes verification exact for them.
    """
    x = logits.float()
    extra = (1,) * (x.dim() - 1)  # broadcast [N] over [N, (S,) V]
    if st.all_greedy:
        return torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    x = x / st.temperature.view(-1, *extra)
    if st.use_top_k or st.use_top_p:
        # One sort serves both filters. When every row has a top-k, only the max_top_k best can survive: topk is
        # far cheaper than sorting the vocabulary (H200, 64 rows x 9 x 152k: a full sort costs ~19 ms).
        # (On exact float ties at the cut, topk may drop a token HF would keep: measure-zero for real logits.)
        sx, si = x.topk(st.max_top_k, -1) if st.max_top_k else x.sort(-1, descending=True)
        if st.use_top_k:
            # Keep every token whose logit ties the k-th largest, as HF's TopKLogitsWarper does.
            kth = sx.gather(-1, (st.top_k.view(-1, *extra) - 1).expand(*sx.shape[:-1], 1))
            sx = sx.masked_fill(sx < kth, float("-inf"))
        if st.use_top_p:
            # Drop a token when the tokens ranked above it already reach top_p (HF: ascending cumsum
            # <= 1 - top_p, the same set); the top token always survives since its prefix sum is 0 < top_p.
            sp = sx.softmax(-1)
            before = sp.cumsum(-1) - sp
            sx = sx.masked_fill(before >= st.top_p.view(-1, *extra), float("-inf"))
        x = (torch.full_like(x, float("-inf")) if st.max_top_k else torch.empty_like(x)).scatter_(-1, si, sx)
    probs = x.softmax(-1)
    if st.any_greedy:
        onehot = torch.zeros_like(probs).scatter_(-1, logits.float().argmax(-1, keepdim=True), 1.0)
        probs = torch.where(st.greedy.view(-1, *extra), onehot, probs)
    return probs


def _noise(kind: str, shape: tuple[int, ...], generators, device) -> torch.Tensor:
    """Uniform [0, 1) or Exp(1) noise [N, ...]; row ``i`` drawn from ``generators[i]`` when it has one.

    One call for all rows without their own generator (or for all rows when a single generator is given), then
    one call per row with a generator, and per slot of a ``PositionSeed`` row (its noise at each position is fixed
    by the seed and the position alone).
    """
    out = torch.empty(shape, device=device)
    draw = (lambda t, g: t.uniform_(generator=g)) if kind == "uniform" else (lambda t, g: t.exponential_(generator=g))
    if generators is None or isinstance(generators, torch.Generator):
        return draw(out, generators)
    draw(out, None)
    dev = torch.device(device)
    for i, g in enumerate(generators):
        if isinstance(g, PositionSeed):
            if kind == "uniform":  # coupled rows read no uniforms (rejection_sample)
                continue
            rows = out[i] if out.dim() == 2 else out[i].unbind(0)  # [V], or [S, V]: slot s is position + s
            for s, row in enumerate([rows] if out.dim() == 2 else rows):
                draw(row, _position_generator(g.seed, g.position + s, dev))
        elif g is not None:
            draw(out[i], g)
    return out


def _race(weights: torch.Tensor, generators) -> torch.Tensor:
    """Sample index ~ weights (unnormalised, >= 0) along the last dim: argmax(w / E), E ~ Exp(1) i.i.d.

    The exponential race is exact (min_x E_x / w_x is attained at x with probability w_x / Σw) and, unlike
    ``torch.multinomial``, needs no host sync (gpt-fast's ``multinomial_sample_one_no_sync``).
    """
    return (weights / _noise("exp", tuple(weights.shape), generators, weights.device)).argmax(-1)


def sample(logits: torch.Tensor, params, generators=None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [N, V] -> (tokens [N] int64, probs [N, V] float32: the distribution sampled from).

    Used for non-speculative steps and for drafting; keep ``probs`` of drafts for ``rejection_sample``.
    ``params``: one ``SamplingParams`` for all rows, one per row, or a prebuilt ``SamplingTensors``.
    """
    st = _as_tensors(params, logits)
    probs = probs_from_logits(logits, st)  # [N, V]
    if st.all_greedy:
        return probs.argmax(-1), probs
    return _race(probs, generators), probs  # greedy rows: one-hot probs, so the race returns the argmax


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  num_drafts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens [N, k], target_logits [N, k+1, V] -> (accepted [N] int64, tokens [N, k+1] int64).

    ``tokens[r, :accepted[r]]`` are the accepted drafts (== the target's argmaxes), ``tokens[r, accepted[r]]`` the
    target's argmax at the first mismatch (or the bonus token), later slots ``-1``.
    """
    n, k = draft_tokens.shape
    t = target_logits.argmax(-1)  # [N, k+1] the target's greedy token after each verify input
    match = draft_tokens == t[:, :k]  # [N, k]
    if num_drafts is not None:
        match &= torch.arange(k, device=t.device) < num_drafts.view(-1, 1)
    accepted = match.long().cumprod(1).sum(1)  # [N] longest matching prefix
    tokens = t.masked_fill(torch.arange(k + 1, device=t.device) > accepted.view(-1, 1), -1)
    return accepted, tokens


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p, q: [N, V] -> unnormalised max(p - q, 0). Falls back to p where the residual is all zero (p == q up to
    rounding: then rejection had probability ~0 anyway)."""
    r = (p - q).clamp_min(0.0)
    return torch.where(r.sum(-1, keepdim=True) > 0, r, p)


def rejection_sample(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
                     params, generators=None,
                     num_drafts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens [N, k] (sampled from draft_probs), draft_probs [N, k, V] (from ``sample``), target_logits
    [N, k+1, V] -> (accepted [N] int64, tokens [N, k+1] int64) laid out as in ``greedy_verify``.

    Rows with fewer drafts pass ``num_drafts [N]``; their padded slots are never accepted and their draft
    probabilities are ignored, so the emitted token there is the bonus ``~ p_{j+1}``. ``draft_probs`` may be None
    when every row is greedy (then this is ``greedy_verify``).
    """
    n, k = draft_tokens.shape
    st = _as_tensors(params, target_logits)
    if st.all_greedy:
        return greedy_verify(draft_tokens, target_logits, num_drafts)
    if draft_probs is None:
        raise ValueError("rejection_sample needs draft_probs (from sample()) when any row has temperature > 0")
    dev = target_logits.device
    valid = torch.ones(n, k, dtype=torch.bool, device=dev)  # [N, k]
    if num_drafts is not None:
        valid = torch.arange(k, device=dev) < num_drafts.view(-1, 1)
    p = probs_from_logits(target_logits, st)  # [N, k+1, V]
    q = draft_probs.float() * valid.unsqueeze(-1)  # [N, k, V], zero on padded slots
    d = draft_tokens.long().unsqueeze(-1)  # [N, k, 1]
    p_d = p[:, :k].gather(-1, d).squeeze(-1)  # [N, k] p_i(d_i)
    q_d = q.gather(-1, d).squeeze(-1)  # [N, k] q_i(d_i) > 0 on valid slots: d_i was drawn from q_i
    u = _noise("uniform", (n, k), generators, dev)  # [N, k]
    accept = (u * q_d < p_d) & valid  # u < p/q without dividing: accept with prob min(1, p/q)
    accepted = accept.long().cumprod(1).sum(1)  # [N] drafts kept before the first rejection
    # Slot a = accepted: residual max(p_a - q_a, 0); for a == j the padded q_a is 0, so it is p_{j+1} (the bonus).
    rows = torch.arange(n, device=dev)
    q_pad = torch.cat([q, q.new_zeros(n, 1, q.shape[-1])], 1)  # [N, k+1, V]
    coupled = _coupled_rows(generators)
    plain = generators if coupled is None else [None if c else g for c, g in zip(coupled, generators)]
    x = _race(_residual(p[rows, accepted], q_pad[rows, accepted]), plain)  # [N]
    if coupled is not None:
        # Gumbel-max coupling (seeded rows, PositionSeed): x_i = argmax(p_i / E_i) with the position's own noise,
        # which also drew the draft (d_i = argmax(q_i / E_i)); accept d_i iff d_i == x_i, emit x at the first
        # mismatch or the bonus slot. The emitted token is x_i whatever the drafts were: a function of the seed,
        # the position and p alone.
        x_all = (p / _noise("exp", tuple(p.shape), generators, dev)).argmax(-1)  # [N, k+1]
        accepted_c = ((draft_tokens.long() == x_all[:, :k]) & valid).long().cumprod(1).sum(1)
        mask = to_device(coupled, dev, torch.bool)
        accepted = torch.where(mask, accepted_c, accepted)
        x = torch.where(mask, x_all[rows, accepted], x)
    tokens = torch.cat([draft_tokens.long(), draft_tokens.new_zeros(n, 1, dtype=torch.long)], 1)  # [N, k+1]
    tokens[rows, accepted] = x
    tokens = tokens.masked_fill(torch.arange(k + 1, device=dev) > accepted.view(-1, 1), -1)
    return accepted, tokens


def _coupled_rows(generators) -> list[bool] | None:
    """Per row: verified by Gumbel-max coupling (a PositionSeed row); None when no row is."""
    if generators is None or isinstance(generators, torch.Generator):
        return None
    rows = [isinstance(g, PositionSeed) for g in generators]
    return rows if any(rows) else None


# Built tensors of a single SamplingParams, by (temperature, top_k, top_p, rows, vocab, device): each build is four
# torch.full launches, and a sampled speculative step builds twice (drafts, verification) with the same few shapes.
# The tensors are only read.
_BUILT: OrderedDict[tuple, SamplingTensors] = OrderedDict()
_BUILT_MAX = 64


def _as_tensors(params, logits: torch.Tensor) -> SamplingTensors:
    if isinstance(params, SamplingTensors):
        return params
    n, vocab, device = logits.shape[0], logits.shape[-1], logits.device
    if not isinstance(params, SamplingParams):
        return SamplingTensors.build(params, n, vocab, device)
    key = (params.temperature, params.top_k, params.top_p, n, vocab, device)
    st = _BUILT.get(key)
    if st is None:
        st = _BUILT[key] = SamplingTensors.build(params, n, vocab, device)
        if len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
    else:
        _BUILT.move_to_end(key)
    return st
