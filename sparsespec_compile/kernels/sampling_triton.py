"""Triton kernels of sampling at temperature with top-k / top-p, without sorting the vocabulary.

One program per row. A sort is what a nucleus is usually found with; here the kept set's threshold (see
sampling_reference.py for the definition both share) is *searched*: each pass over the row evaluates, at NPIV pivot
values at once, the count (top-k) or the probability mass (top-p) of the tokens at or above each pivot and the
nearest present value below it, and narrows the interval ``[A, H]`` that holds the threshold. Half the pivots are
spread evenly in value (few passes on real, peaked logits), half evenly in the float's bit order: a proven bound,
each pass cuts the interval's 2**32 bit patterns by 9, so a phase ends within 12 passes. The search ends on a present
value, so the kept set is exact, ties and -inf included. Top-k and top-p are two phases (the top-p target is a share
of the top-k set's mass).

Pass 1 also runs the Gumbel race over the whole row (and finds max, argmax, min and the sum of exponentials); when
its winner lies in the kept set it is the kept set's winner too, and no race pass follows (for top-p 0.95, ~95% of
rows). A row whose stats nobody reads (a plain decode, not a draft) stops the search as soon as its winner is proven
kept. Greedy rows make one lean argmax pass. Noise is regenerated from (row seed, token index) in every pass, never
stored: bit-identical to the reference's ``uniform``.

``residual`` samples max(p - q, 0) for speculative verification in one pass over the target and draft rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NPIV = 16  # pivots per search pass: 8 in value, 8 in bit order
BLOCK = 1024  # tokens per step of pass 1 and of the race passes
BLOCK_S = 128  # tokens per step of a search pass ([BLOCK_S, NPIV] compares)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_key(seed):
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))


@triton.jit
def _uniform(key, idx):
    """U(0, 1) at counter ``idx`` of the stream ``key``: the reference's ``uniform``."""
    h = _mix32(_mix32(idx.to(tl.uint32)) ^ key)
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _exp_noise(key, idx):
    """E ~ Exp(1) at token ``idx`` of the stream ``key``: -log U."""
    return -tl.log(_uniform(key, idx))


@triton.jit
def _float_key(x):
    """float32 -> int32 that orders like the float (negative floats have their magnitude bits flipped)."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_float(k):
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _load_row(base, idx, V, it, UPCAST: tl.constexpr):
    l = tl.load(base + idx, mask=idx < V, other=float("-inf"))
    if UPCAST:
        l = l.to(tl.float32)
    return l * it


@triton.jit
def _sample_kernel(logits, stride_l, rows, inv_temp, top_k, top_p, greedy, seeds, need_stats, tokens, stats, V,
                   BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, NPIV: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.program_id(0)
    base = logits + tl.load(rows + r).to(tl.int64) * stride_l
    it = tl.load(inv_temp + r)
    kk = tl.load(top_k + r)
    pp = tl.load(top_p + r)
    g = tl.load(greedy + r) != 0
    key = _row_key(tl.load(seeds + r))
    offs = tl.arange(0, BLOCK)
    ninf = float("-inf")

    # pass 1: max / first argmax, min of the valid, sum exp(l - max) (online), count, the race over all tokens
    m = tl.full((), ninf, tl.float32)
    zsum = tl.full((), 0.0, tl.float32)
    mn = tl.full((), float("inf"), tl.float32)
    nvalid = tl.full((), 0, tl.int32)
    am = tl.full((), 0, tl.int32)
    rk = tl.full((), ninf, tl.float32)
    ri = tl.full((), 0, tl.int32)
    rl = tl.full((), ninf, tl.float32)
    if g:  # a greedy row: the argmax alone, one lean pass (it pays nothing for the sampled rows beside it)
        for start in range(0, V, BLOCK):
            l = _load_row(base, start + offs, V, it, UPCAST)
            bm = tl.max(l, 0)
            am = tl.where(bm > m, tl.argmax(l, 0) + start, am)  # strictly greater: the first index on ties
            m = tl.maximum(m, bm)
    else:
        for start in range(0, V, BLOCK):
            idx = start + offs
            l = _load_row(base, idx, V, it, UPCAST)
            valid = l > ninf
            bm = tl.max(l, 0)
            am = tl.where(bm > m, tl.argmax(l, 0) + start, am)  # strictly greater: the first index on ties
            new_m = tl.maximum(m, bm)
            scale = tl.where(new_m == ninf, 0.0, tl.exp(m - new_m))
            zsum = zsum * scale + tl.sum(tl.where(valid, tl.exp(l - new_m), 0.0), 0)
            m = new_m
            mn = tl.minimum(mn, tl.min(tl.where(valid, l, float("inf")), 0))
            nvalid += tl.sum(valid.to(tl.int32), 0)
            race = tl.where(valid, l - tl.log(_exp_noise(key, idx)), ninf)
            bk = tl.max(race, 0)
            bi = tl.argmax(race, 0)
            upd = bk > rk
            rl = tl.where(upd, tl.max(tl.where(offs == bi, l, ninf), 0), rl)
            ri = tl.where(upd, bi + start, ri)
            rk = tl.maximum(rk, bk)

    # Threshold search: phase 0 top-k (F = count >= k), phase 1 top-p (F = mass >= top_p * top-k mass), 2 done.
    # Invariant: F(A) >= target (A is at or below the answer), H is a present value at or above it. Each pass
    # evaluates F at pivots in [A, H], H among them: if F(H) >= target the answer is H; else A rises to the largest
    # good pivot and H falls to the largest present value below the smallest bad one.
    use_k = (kk < nvalid) & (~g)
    use_p = (pp < 1.0) & (~g)
    phase = tl.where(use_k, 0, tl.where(use_p, 1, 2))
    phase = tl.where((mn >= m) | (nvalid == 0), 2, phase)  # one distinct value (or none): everything is kept
    need = tl.load(need_stats + r) != 0
    early = tl.full((), 0, tl.int1)  # the race winner was proven kept without finding the threshold
    done = tl.full((), 2, tl.int32)  # (loop-carried values keep one type: a tensor, never a Python int)
    A = mn
    H = m
    tau = mn
    FLm = zsum  # mass at or above tau
    target = tl.where(phase == 0, kk.to(tl.float32), pp * zsum)  # counts as float32: exact below 2**24 tokens
    j = tl.arange(0, NPIV)
    half: tl.constexpr = NPIV // 2
    last = j == half - 1  # the pivot that is H
    offs_s = tl.arange(0, BLOCK_S)
    passes = tl.full((), 0, tl.int32)
    while phase < 2:
        tv = tl.minimum(A + (H - A) * ((j + 1).to(tl.float32) / half), H)
        ka = _float_key(A).to(tl.int64)
        kh = _float_key(H).to(tl.int64)
        tk = _key_float((ka + (kh - ka) * (j - half + 1) // (half + 1)).to(tl.int32))
        piv = tl.where(last, H, tl.where(j < half, tv, tl.minimum(tl.maximum(tk, A), H)))
        f = tl.zeros((NPIV,), tl.float32)
        maxlt = tl.full((NPIV,), ninf, tl.float32)
        c_h = tl.full((), 0.0, tl.float32)  # count and mass at or above H
        m_h = tl.full((), 0.0, tl.float32)
        c_gt = tl.full((), 0.0, tl.float32)  # count and mass above the race winner's value
        m_gt = tl.full((), 0.0, tl.float32)
        for start in range(0, V, BLOCK_S):
            l = _load_row(base, start + offs_s, V, it, UPCAST)
            valid = l > ninf
            e = tl.where(valid, tl.exp(l - m), 0.0)
            w = tl.where(phase == 0, valid.to(tl.float32), e)
            ge = l[:, None] >= piv[None, :]
            f += tl.sum(tl.where(ge, w[:, None], 0.0), 0)
            maxlt = tl.maximum(maxlt, tl.max(tl.where(ge, ninf, l[:, None]), 0))  # (-inf rows add nothing)
            at_h = valid & (l >= H)
            c_h += tl.sum(at_h.to(tl.float32), 0)
            m_h += tl.sum(tl.where(at_h, e, 0.0), 0)
            gt = valid & (l > rl)
            c_gt += tl.sum(gt.to(tl.float32), 0)
            m_gt += tl.sum(tl.where(gt, e, 0.0), 0)
        passes += 1
        # A row that needs no stats stops once its race winner is proven kept: within the top-k alone
        # (count above it < k), or within the top-p of the top-k set already found (mass above it < target).
        kept = tl.where(phase == 0, (~use_p) & (c_gt < target), (rl >= A) & (m_gt < target))
        if (~need) & kept:
            early = tl.full((), 1, tl.int1)
            phase = done
        else:
            good = f >= target
            if tl.where(phase == 0, c_h, m_h) >= target:  # the answer is H
                tau = H
                FLm = m_h
                if phase == 0:  # the top-k set found: top-p searches inside it, from its threshold up
                    phase = tl.where(use_p, 1, 2)
                    target = pp * m_h
                    A = H
                    H = m
                    phase = tl.where(A >= H, 2, phase)
                else:
                    phase = done
            else:
                A = tl.maximum(A, tl.max(tl.where(good & (~last), piv, ninf), 0))
                H_new = tl.min(tl.where(good & (~last), float("inf"), maxlt), 0)  # H itself counts as bad
                # (below A only through rounding, top_p within ~1e-7 of 1: keep H, one present value above)
                if (H_new < A) | (passes >= 64):  # 64: unreachable, each phase ends within 12 passes
                    tau = H
                    FLm = m_h
                    phase = done
                H = H_new

    tok = ri
    tl_tok = rl
    if (rl < tau) & (~g) & (~early):  # the race winner was cut: race again over the kept set only
        rk = tl.full((), ninf, tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            l = _load_row(base, idx, V, it, UPCAST)
            race = tl.where(l >= tau, l - tl.log(_exp_noise(key, idx)), ninf)
            bk = tl.max(race, 0)
            bi = tl.argmax(race, 0)
            upd = bk > rk
            tl_tok = tl.where(upd, tl.max(tl.where(offs == bi, l, ninf), 0), tl_tok)
            tok = tl.where(upd, bi + start, tok)
            rk = tl.maximum(rk, bk)
    tok = tl.where(g, am, tok)
    tl.store(tokens + r, tok.to(tl.int64))
    tl.store(stats + r * 5 + 0, m)
    nan = float("nan")  # a row that stopped early has no kept set: NaN, never a wrong number
    tl.store(stats + r * 5 + 1, tl.where(g, m, tl.where(early, nan, tau)))
    tl.store(stats + r * 5 + 2, tl.where(g, 1.0, tl.where(early, nan, FLm)))
    tl.store(stats + r * 5 + 3, tl.where(g, 1.0, tl.where(early, nan, tl.exp(tl_tok - m) / tl.where(FLm > 0, FLm, 1.0))))
    tl.store(stats + r * 5 + 4, _uniform(key, tl.full((), 0, tl.int32) + V))  # counter V: the acceptance uniform


@triton.jit
def _residual_kernel(t_logits, stride_t, t_rows, t_stats, d_logits, stride_d, d_rows, d_stats, inv_temp, seeds,
                     need, tokens, V, BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    r = tl.program_id(0)
    if tl.load(need + r) != 0:
        it = tl.load(inv_temp + r)
        tb = t_logits + tl.load(t_rows + r).to(tl.int64) * stride_t
        db = d_logits + tl.load(d_rows + r).to(tl.int64) * stride_d
        mp = tl.load(t_stats + r * 5)
        tp = tl.load(t_stats + r * 5 + 1)
        zp = tl.load(t_stats + r * 5 + 2)
        mq = tl.load(d_stats + r * 5)
        tq = tl.load(d_stats + r * 5 + 1)
        zq = tl.load(d_stats + r * 5 + 2)
        key = _row_key(tl.load(seeds + r))
        offs = tl.arange(0, BLOCK)
        bw = tl.full((), -1.0, tl.float32)
        iw = tl.full((), 0, tl.int32)
        bp = tl.full((), -1.0, tl.float32)
        ip = tl.full((), 0, tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            lp = _load_row(tb, idx, V, it, UPCAST)
            lq = _load_row(db, idx, V, it, UPCAST)
            p = tl.where(lp >= tp, tl.exp(lp - mp) / zp, 0.0)
            q = tl.where(lq >= tq, tl.exp(lq - mq) / zq, 0.0)
            w = tl.maximum(p - q, 0.0)
            e = _exp_noise(key, idx)
            kw = tl.where(w > 0, w / e, -1.0)
            kp = tl.where(p > 0, p / e, -1.0)
            b = tl.max(kw, 0)
            iw = tl.where(b > bw, tl.argmax(kw, 0) + start, iw)
            bw = tl.maximum(bw, b)
            b = tl.max(kp, 0)
            ip = tl.where(b > bp, tl.argmax(kp, 0) + start, ip)
            bp = tl.maximum(bp, b)
        tl.store(tokens + r, tl.where(bw > 0, iw, ip).to(tl.int64))  # all-zero residual (p == q): ~ p


def _check_logits(*logits: torch.Tensor) -> None:
    for x in logits:
        if x.dim() != 2 or x.stride(-1) != 1:
            raise ValueError(f"logits must be [rows, V] with unit stride along V, got {tuple(x.shape)} "
                             f"strides {x.stride()}")


def _per_row(n: int, *vectors: torch.Tensor) -> list[torch.Tensor]:
    """Per-row inputs as contiguous [n] (a strided view of a few hundred elements costs one tiny copy)."""
    for v in vectors:
        if v.shape[0] != n:
            raise ValueError(f"per-row tensors must have {n} rows, got {tuple(v.shape)}")
    return [v.contiguous() for v in vectors]


def sample_rows(logits: torch.Tensor, rows: torch.Tensor, inv_temp: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, greedy: torch.Tensor, seeds: torch.Tensor,
                need_stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [Rows, V] (any float dtype), rows [R] int64 (which logits row each output row reads), inv_temp [R] f32,
    top_k [R] int64 (>= V: off), top_p [R] f32 (1: off), greedy [R] bool, seeds [R] int64 ->
    (tokens [R] int64, stats [R, 5] f32 = (max l, tau, kept mass z, p(token), u)). No host sync: graph-capturable.
    ``u``: the row's uniform at counter V (verification's acceptance test reads it: no noise kernel of its own).

    ``need_stats`` [R] bool (None: all): a row without it may stop as soon as its race winner is proven kept (top-p
    alone, ~1 pass after the first for top-p 0.95), its tau / z / p(token) then NaN; the token is the same."""
    _check_logits(logits)
    n, v = rows.shape[0], logits.shape[1]
    if need_stats is None:
        need_stats = torch.ones(n, dtype=torch.bool, device=logits.device)
    rows, inv_temp, top_k, top_p, greedy, seeds, need_stats = _per_row(n, rows, inv_temp, top_k, top_p, greedy, seeds,
                                                                      need_stats)
    tokens = torch.empty(n, dtype=torch.int64, device=logits.device)
    stats = torch.empty(n, 5, dtype=torch.float32, device=logits.device)
    if n:
        _sample_kernel[(n,)](logits, logits.stride(0), rows, inv_temp, top_k, top_p, greedy, seeds, need_stats, tokens,
                             stats, v, BLOCK=BLOCK, BLOCK_S=BLOCK_S, NPIV=NPIV, UPCAST=logits.dtype != torch.float32)
    return tokens, stats


def residual(target_logits: torch.Tensor, target_rows: torch.Tensor, target_stats: torch.Tensor,
             draft_logits: torch.Tensor, draft_rows: torch.Tensor, draft_stats: torch.Tensor, inv_temp: torch.Tensor,
             seeds: torch.Tensor, need: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Writes ``out[r]`` ~ norm(max(p - q, 0)) of target row ``target_rows[r]`` and draft row ``draft_rows[r]`` (stats
    [R, 5] from ``sample_rows``) where ``need[r]``; other rows of ``out`` are left as they are."""
    _check_logits(target_logits, draft_logits)
    n = target_rows.shape[0]
    if not out.is_contiguous() or out.shape != (n,):
        raise ValueError(f"out must be a contiguous [{n}] tensor, got {tuple(out.shape)}")
    target_rows, draft_rows, inv_temp, seeds, need = _per_row(n, target_rows, draft_rows, inv_temp, seeds, need)
    if target_logits.shape[1] != draft_logits.shape[1] or target_logits.dtype != draft_logits.dtype:
        raise ValueError("target and draft logits must share V and dtype")
    if n:
        _residual_kernel[(n,)](target_logits, target_logits.stride(0), target_rows, target_stats.contiguous(),
                               draft_logits, draft_logits.stride(0), draft_rows, draft_stats.contiguous(), inv_temp,
                               seeds, need, out, target_logits.shape[1], BLOCK=BLOCK,
                               UPCAST=target_logits.dtype != torch.float32)
    return out


__all__ = ["residual", "sample_rows"]
