"""Sampling and lossless speculative verification, on the device (no host sync: every decision is a tensor op,
and the branches taken on the host depend only on the ``SamplingParams``, never on tensor values).

Shapes: ``N`` rows (requests), ``k`` draft slots (rows with fewer drafts pass ``num_drafts``), ``V`` vocabulary.

A sampled row's distribution is a threshold on its scaled logits (kernels/sampling_reference.py): no sort finds it,
and a row is carried by ``stats = (m, tau, z, p(token), u)`` instead of a [V] probability vector. On CUDA the Triton
kernels (kernels/sampling_triton.py) do the work, elsewhere their torch reference; both draw the same noise, a hash
of (row seed, token index), so a row's token depends on its seed and logits alone.

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

import numpy as np
import torch

from sparsespec_compile.kernels import sampling_reference as ref

from .host_copy import to_device
from .sampling_params import SamplingParams

_SEED_MAX = 1 << 62


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for the noise seeds of unseeded rows (tests pass one to be deterministic)."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class PositionSeed:
    """The noise of a seeded request's row: output position ``position`` (``+ s`` for verify slot ``s``) always gets
    the same draws, from the noise seed of (seed, position).

    A seeded request's draws cannot come from a stream and stay reproducible under speculation: how many draws a step
    takes (drafts per cycle, the phase a request is staggered to) and the draft distributions (pillars refreshed at
    each verify) depend on what else is batched. So seeded rows use noise keyed by position, and verify by Gumbel-max
    coupling (``rejection_sample``): the token emitted at a position is the race winner of p under that position's
    noise, whatever the drafts were. Exact: the noise is fresh for each position, independent of the prefix.
    """

    seed: int
    position: int

    def noise_seed(self, slot: int = 0) -> int:
        # splitmix64 of (seed, position): nearby positions and seeds get unrelated streams
        m = (1 << 64) - 1
        z = (self.seed * 0x9E3779B97F4A7C15 + self.position + slot + 1) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return (z ^ (z >> 31)) % _SEED_MAX


def noise_seeds(n: int, slots: int | None, seeds, device, generator: torch.Generator | None = None):
    """Noise seeds [n] (``slots`` None) or [n, slots] int64 on ``device``, and the mask [n] of PositionSeed rows (None
    when there are none). ``seeds``: None, one PositionSeed-or-None per row, or a prebuilt int64 tensor. Unseeded rows
    draw theirs on the device (``generator`` or the default one): nothing is read on the host."""
    shape = (n,) if slots is None else (n, slots)
    if isinstance(seeds, torch.Tensor):
        return seeds.to(device), None
    out = torch.randint(0, _SEED_MAX, shape, generator=generator, device=device)
    if seeds is None or not any(isinstance(s, PositionSeed) for s in seeds):
        return out, None
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} rows")
    # one host->device copy: the fixed seeds [n, slots] and the 0/1 mask [n] (a Python noise_seed per slot was
    # 2,070 calls for a B 230 k 8 verify)
    host = np.zeros((n, (slots or 1) + 1), dtype=np.int64)
    rows = [i for i, s in enumerate(seeds) if isinstance(s, PositionSeed)]
    host[rows, :-1] = _noise_seeds([seeds[i] for i in rows], slots or 1)
    host[rows, -1] = 1
    dev = to_device(torch.from_numpy(host), device)
    mask, fixed_t = dev[:, -1] != 0, dev[:, :-1].reshape(shape)
    return torch.where(mask.view(-1, *([1] * (len(shape) - 1))), fixed_t, out), mask


def _noise_seeds(seeds: list[PositionSeed], slots: int) -> np.ndarray:
    """``[[s.noise_seed(j) for j in range(slots)] for s in seeds]`` as an int64 array [len(seeds), slots], in numpy
    (uint64 arithmetic wraps mod 2**64 as the masks of PositionSeed.noise_seed do)."""
    with np.errstate(over="ignore"):
        seed = np.array([s.seed for s in seeds], dtype=np.uint64)[:, None]
        pos = np.array([s.position for s in seeds], dtype=np.uint64)[:, None]
        z = seed * np.uint64(0x9E3779B97F4A7C15) + pos + np.arange(1, slots + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return ((z ^ (z >> np.uint64(31))) % np.uint64(_SEED_MAX)).astype(np.int64)


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters on the device (the kernels' inputs), plus host flags that pick the code path."""

    # Device tensors [N]; None when every row is greedy (the argmax path reads none of them: no H2D copy per step).
    inv_temp: torch.Tensor | None  # float32, 1 / temperature (greedy rows hold 1.0)
    top_k: torch.Tensor | None  # int64, V where off
    top_p: torch.Tensor | None  # float32, 1.0 where off
    greedy: torch.Tensor | None  # bool
    any_greedy: bool
    all_greedy: bool
    any_filter: bool = True  # some sampled row has a top-k below V or a top-p below 1 (False: the kernel skips the
    # search, sampling_triton.sample_rows with top_k / top_p None)

    @classmethod
    def build(cls, params: SamplingParams | Sequence[SamplingParams], n: int, vocab: int,
              device: torch.device | str, repeat: int = 1) -> "SamplingTensors":
        """``repeat``: each row's parameters ``repeat`` times in a row (a verify row's k + 1 slots)."""
        one = isinstance(params, SamplingParams)
        rows = [params] if one else list(params)
        if not one and len(rows) != n:
            raise ValueError(f"got {len(rows)} SamplingParams for {n} rows")
        greedy = [p.greedy for p in rows]
        if all(greedy):
            return cls(None, None, None, None, any_greedy=True, all_greedy=True, any_filter=False)
        values = ([1.0 if g else 1.0 / p.temperature for p, g in zip(rows, greedy)],
                  [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in rows], [p.top_p for p in rows], greedy)
        if one:  # one set for every row: no per-row Python work, no host list -> device copy
            inv_temp, top_k, top_p, g = (torch.full((n * repeat,), xs[0], dtype=dt, device=device)
                                         for xs, dt in zip(values, (torch.float32, torch.int64, torch.float32,
                                                                    torch.bool)))
        else:
            inv_temp, top_k, top_p, g = _rows_on_device(values, repeat, device)
        return cls(inv_temp=inv_temp, top_k=top_k, top_p=top_p, greedy=g, any_greedy=any(greedy), all_greedy=False,
                   any_filter=any(not g and (0 < p.top_k < vocab or p.top_p < 1.0) for p, g in zip(rows, greedy)))


def _rows_on_device(values, repeat: int, device):
    """Per-row (inv_temp, top_k, top_p, greedy), each repeated ``repeat`` times a row, as device tensors from one
    host->device copy of their bytes (four copies and four repeat_interleave launches otherwise)."""
    inv_temp, top_k, top_p, greedy = (np.repeat(np.asarray(xs, dtype=dt), repeat) for xs, dt in
                                      zip(values, (np.float32, np.int64, np.float32, np.bool_)))
    parts = (top_k, inv_temp, top_p, greedy)  # widest first: every part's offset is a multiple of its item size
    host = np.concatenate([a.view(np.uint8) for a in parts])
    dev = to_device(torch.from_numpy(host), device, torch.uint8)
    out, at = [], 0
    for a, dt in zip(parts, (torch.int64, torch.float32, torch.float32, torch.bool)):
        out.append(dev[at:at + a.nbytes].view(dt))
        at += a.nbytes
    top_k, inv_temp, top_p, greedy = out
    return inv_temp, top_k, top_p, greedy


def _impl(logits: torch.Tensor, impl: str) -> str:
    if impl == "auto":
        return "triton" if logits.is_cuda else "reference"
    if impl not in ("triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    return impl


def sample_rows(logits: torch.Tensor, rows: torch.Tensor | None, st: SamplingTensors, seeds: torch.Tensor,
                impl: str = "auto", need_stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [Rows, V], rows [R] (None: every row) -> (tokens [R] int64, stats [R, 5]). Sampled rows only
    (``st`` not all-greedy). ``need_stats`` [R] bool (None: all): rows whose stats are read later (a hint; the
    split-search kernel computes every row's stats at no extra cost, sampling_triton.sample_rows)."""
    if _impl(logits, impl) == "triton":
        from sparsespec_compile.kernels.sampling_triton import sample_rows as kernel

        if rows is None:
            rows = torch.arange(logits.shape[0], device=logits.device)
        filters = (st.top_k, st.top_p) if st.any_filter else (None, None)
        return kernel(logits, rows, st.inv_temp, *filters, st.greedy, seeds, need_stats)
    x = logits if rows is None else logits[rows]
    return ref.sample_rows_reference(x, st.inv_temp, st.top_k, st.top_p, st.greedy, seeds)


def sample(logits: torch.Tensor, params, seeds=None, generator: torch.Generator | None = None,
           rows: torch.Tensor | None = None, impl: str = "auto",
           need_stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [N, V] (or the rows ``rows`` [N] of a bigger [*, V]) -> (tokens [N] int64, stats [N, 5] float32 or None
    when every row is greedy). Used for non-speculative steps and for drafting: keep a sampled draft's stats (and its
    logits row) for ``rejection_sample``. ``params``: one ``SamplingParams``, one per row, or ``SamplingTensors``;
    ``seeds``: see ``noise_seeds``; ``need_stats``: see ``sample_rows``."""
    n = logits.shape[0] if rows is None else rows.shape[0]
    st = _as_tensors(params, n, logits.shape[-1], logits.device)
    if st.all_greedy:
        return (logits if rows is None else logits[rows]).argmax(-1), None
    s, _ = noise_seeds(n, None, seeds, logits.device, generator)
    return sample_rows(logits, rows, st, s, impl, need_stats)


def probs_from_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """logits [N, V] or [N, S, V] -> float32 probabilities after temperature, top-k, top-p (the distribution the
    samplers draw from; dense, for tests and checks). Greedy rows become one-hot at the argmax (first on ties)."""
    x = logits.float()
    onehot = torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    if st.all_greedy:
        return onehot
    shape = x.shape
    flat = x.reshape(-1, shape[-1])  # [R, V]; per-request params repeat over a row's slots
    rep = lambda t: t if t.shape[0] == flat.shape[0] else t.repeat_interleave(flat.shape[0] // t.shape[0])  # noqa: E731
    l, m, tau, z = ref.thresholds(flat, rep(st.inv_temp), rep(st.top_k), rep(st.top_p), rep(st.greedy))
    probs = ref.row_probs(l, torch.stack([m, tau, z], -1)).view(shape)
    return torch.where(rep(st.greedy).view(*shape[:-1], 1), onehot, probs)


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor,
                  num_drafts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens [N, k], target_logits [N, k+1, V] -> (accepted [N] int64, tokens [N, k+1] int64)."""
    return greedy_accept(draft_tokens, target_logits.argmax(-1), num_drafts)


def greedy_accept(draft_tokens: torch.Tensor, t: torch.Tensor,
                  num_drafts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` [N, k+1]: the target's token after each verify input. ``tokens[r, :accepted[r]]`` are the accepted drafts,
    ``tokens[r, accepted[r]]`` the target's token at the first mismatch (or the bonus token), later slots ``-1``."""
    n, k = draft_tokens.shape
    match = draft_tokens == t[:, :k]  # [N, k]
    if num_drafts is not None:
        match &= torch.arange(k, device=t.device) < num_drafts.view(-1, 1)
    accepted = match.long().cumprod(1).sum(1)  # [N] longest matching prefix
    tokens = t.masked_fill(torch.arange(k + 1, device=t.device) > accepted.view(-1, 1), -1)
    return accepted, tokens


def _prob_at(l: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Scaled logits [...] of chosen tokens and their rows' stats [..., 5] -> the tokens' probabilities [...]."""
    return torch.where(l >= stats[..., 1], (l - stats[..., 0]).exp() / stats[..., 2], 0.0)


@dataclass
class Drafts:
    """What verification needs of the sampled drafts: their logits rows [Nd, V] (as the model produced them), stats
    [Nd, 5] from ``sample``, and where each request's slot finds its row, ``index`` [N, k] (-1: none)."""

    logits: torch.Tensor
    stats: torch.Tensor
    index: torch.Tensor

    @classmethod
    def dense(cls, logits: torch.Tensor, stats: torch.Tensor) -> "Drafts":
        """From [N, k, V] logits and [N, k, 5] stats."""
        n, k, v = logits.shape
        return cls(logits.reshape(n * k, v), stats.reshape(n * k, -1),
                   torch.arange(n * k, device=logits.device).view(n, k))


def rejection_sample(draft_tokens: torch.Tensor, drafts: Drafts | None, target_logits: torch.Tensor, params,
                     seeds=None, generator: torch.Generator | None = None, num_drafts: torch.Tensor | None = None,
                     target_index: torch.Tensor | None = None, impl: str = "auto"):
    """draft_tokens [N, k], their ``Drafts``, target_logits [N, k+1, V] (or rows [*, V] with ``target_index`` [N, k+1]
    naming slot s's row) -> (accepted [N] int64, tokens [N, k+1] int64) laid out as in ``greedy_verify``.

    Rows with fewer drafts pass ``num_drafts [N]``; their padded slots are never accepted, so the emitted token
    there is the bonus ``~ p_{j+1}``. ``drafts`` may be None when every row is greedy. ``seeds``: per row (one
    PositionSeed-or-None each: a PositionSeed row's slot s is its position + s; or an int64 tensor [N, k+1]).
    """
    n, k = draft_tokens.shape
    dev = target_logits.device
    if target_index is None:
        target_index = torch.arange(n * (k + 1), device=dev).view(n, k + 1)
        target_logits = target_logits.reshape(n * (k + 1), -1)
    st = _as_tensors(params, n, target_logits.shape[-1], dev, repeat=k + 1)
    if st.all_greedy:
        return greedy_accept(draft_tokens, target_logits.argmax(-1)[target_index], num_drafts)
    if drafts is None:
        raise ValueError("rejection_sample needs the drafts' logits and stats (from sample()) when any row has "
                         "temperature > 0")
    s, coupled = noise_seeds(n, k + 1, seeds, dev, generator)  # [N, k+1]
    # every slot's target sample (greedy rows: the argmax), and the stats of its distribution
    # (seeded rows read only the winners: their kernel rows may stop before finding the threshold)
    need = None if coupled is None else (~coupled).repeat_interleave(k + 1)
    x, tstats = sample_rows(target_logits, target_index.flatten(), st, s.flatten(), impl, need)
    x, tstats = x.view(n, k + 1), tstats.view(n, k + 1, -1)
    d = draft_tokens.long()
    if num_drafts is None:
        num_drafts = torch.full((n,), k, device=dev)
    valid = torch.arange(k, device=dev) < num_drafts.view(-1, 1)  # [N, k]
    # p_i(d_i) and q_i(d_i) from the logit at d_i and the row's stats (> 0 for q on valid sampled slots: d_i was drawn
    # from q_i)
    it = st.inv_temp.view(n, k + 1)[:, :k]
    di = drafts.index.clamp_min(0)
    p_d = _prob_at(target_logits[target_index[:, :k], d].float() * it, tstats[:, :k])  # [N, k]
    q_d = _prob_at(drafts.logits[di, d].float() * it, drafts.stats[di])
    u = tstats[:, :k, 4]  # [N, k] each slot's own uniform (its noise's counter V: independent of its race)
    by_match = st.greedy.view(n, k + 1)[:, 0]  # greedy rows: accept iff d_i == argmax p_i
    if coupled is not None:
        # Gumbel-max coupling (seeded rows): d_i was drawn with the position's own noise, x_i is the target's winner
        # under it; accept d_i iff d_i == x_i, emit x at the first mismatch or the bonus slot. The emitted token is
        # x_i whatever the drafts were: a function of the seed, the position and p alone.
        by_match = by_match | coupled
    accept = torch.where(by_match.view(-1, 1), d == x[:, :k], u * q_d < p_d) & valid  # u < p/q without dividing
    accepted = accept.long().cumprod(1).sum(1)  # [N] drafts kept before the first rejection
    rows = torch.arange(n, device=dev)
    out = x[rows, accepted]  # the bonus (all accepted), or the match rows' own sample at the first mismatch
    # a rejected sampled draft: the residual max(p_a - q_a, 0) of its slot, with the slot's race noise (independent of
    # the uniform that rejected it, and of the draft's own noise)
    need = ~by_match & (accepted < num_drafts)
    a = accepted.clamp_max(k - 1)
    t_rows, d_rows = target_index[rows, accepted], di[rows, a]
    t_st, d_st, seed_a = tstats[rows, accepted], drafts.stats[d_rows], s[rows, accepted]
    it_a = st.inv_temp.view(n, k + 1)[:, 0]
    if _impl(target_logits, impl) == "triton":
        from sparsespec_compile.kernels.sampling_triton import residual

        out = residual(target_logits, t_rows, t_st, drafts.logits, d_rows, d_st, it_a, seed_a, need, out)
    else:
        r = ref.residual_reference(target_logits[t_rows], t_st, drafts.logits[d_rows], d_st, it_a, seed_a)
        out = torch.where(need, r, out)
    tokens = torch.cat([d, d.new_zeros(n, 1)], 1)  # [N, k+1]
    tokens[rows, accepted] = out
    tokens = tokens.masked_fill(torch.arange(k + 1, device=dev) > accepted.view(-1, 1), -1)
    return accepted, tokens


# Built tensors of a single SamplingParams, by (temperature, top_k, top_p, rows, vocab, device): each build is four
# torch.full launches, and a sampled speculative step builds twice (drafts, verification) with the same few shapes.
# The tensors are only read.
_BUILT: OrderedDict[tuple, SamplingTensors] = OrderedDict()
_BUILT_MAX = 64


def _as_tensors(params, n: int, vocab: int, device, repeat: int = 1) -> SamplingTensors:
    if isinstance(params, SamplingTensors):
        return params
    if not isinstance(params, SamplingParams):
        return SamplingTensors.build(params, n, vocab, device, repeat)
    key = (params.temperature, params.top_k, params.top_p, n * repeat, vocab, device)
    st = _BUILT.get(key)
    if st is None:
        st = _BUILT[key] = SamplingTensors.build(params, n * repeat, vocab, device)
        if len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
    else:
        _BUILT.move_to_end(key)
    return st
