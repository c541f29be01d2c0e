"""Triton kernels of :func:`select_pillars`: the top-``b`` positions of each (row, KV head) score row.

Keys are the scores' float bits as int32 (non-negative floats order like their bit patterns; see ``_key``): invalid
positions -1, the forced newest / first positions above every score. The b-th largest key ``T`` splits a row into
the kept (``key > T``, then the lowest positions with ``key == T``: ties to the lower position, like the reference)
and the dropped; one compaction writes the kept positions in ascending order.

Two ways to find ``T``, by row length:

* ``_select_resident_kernel`` (rows of <= RESIDENT_MAX keys, every step up to 16k contexts): the row is loaded once
  into registers (32 keys a thread) and ``T`` found by bisection on the key value, each step one compare-and-count
  (3 instructions a key a thread, then one block reduction), stopping as soon as exactly ``b`` keys lie above the
  probe. A 256-bin ``tl.histogram`` costs ~115 instructions a thread per 32 keys (8 ballots, 8 bins x 3 bit masks
  and a popcount: Triton's HistogramOpToLLVM), ~3.6 warp-instructions a key per pass, so the four radix passes
  alone were ~14 a key against <= 31 x 3 / 32 ~ 2.9 here; and the radix kernel read the row five times.
* ``_select_radix_kernel`` (longer rows): RAFT's radix select, 8 bits a pass from the top, reading the row in
  BLOCK chunks: four histogram passes fix ``T``, a fifth read writes the winners (the H200 profile: 0.44 ms a
  B 256 step where a 4/16-way search took 10-18 passes; bench/RESULTS.md).

The hybrid draft (kernels/hybrid.py) reuses both with forced sinks and a per-(row, head) window: ``HEAD_SPLIT`` reads
``n_recent`` / ``n_sinks`` from [Rv, H] tensors instead of the scalar ``recent`` (sinks 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import interpreting

# Rows up to this many keys are selected from registers: 16 warps x 32 threads x 32 keys (32 registers a thread).
RESIDENT_MAX = 16384
_FORCED = 0x7F800000  # the key of a forced position: above every score (+inf ranks as the largest finite)


@triton.jit
def _key(scores_row, pos, ctx, n_recent, n_sinks):
    """int32 ranking key: invalid -1 < valid score bits (non-negative floats order like ints) < forced (the newest
    ``n_recent`` and the first ``n_sinks`` positions: the hybrid draft's window and sinks; pillar: no sinks)."""
    s = tl.load(scores_row + pos, mask=pos < ctx, other=0.0).to(tl.float32)
    bits = tl.minimum(s.to(tl.int32, bitcast=True), 0x7F7FFFFF)  # +inf ranks as the largest finite; nan and <= 0 as 0
    key = tl.where(s > 0, bits, 0)
    key = tl.where((pos >= ctx - n_recent) | (pos < n_sinks), 0x7F800000, key)
    return tl.where(pos < ctx, key, -1)


@triton.jit
def _row_setup(ctx_lens, budget, recent, N, head_recent, head_sinks, j, h, HEAD_SPLIT: tl.constexpr):
    """(ctx, b, n_recent, n_sinks) of row j, head h: b = min(budget, ctx), the forced counts clipped to b."""
    ctx = tl.minimum(tl.load(ctx_lens + j).to(tl.int32), N)
    b = tl.minimum(tl.load(budget + j).to(tl.int32), ctx)
    if HEAD_SPLIT:
        n_sinks = tl.minimum(tl.load(head_sinks + j * tl.num_programs(1) + h).to(tl.int32), b)
        n_recent = tl.minimum(tl.load(head_recent + j * tl.num_programs(1) + h).to(tl.int32), b - n_sinks)
    else:
        n_sinks = b * 0
        n_recent = tl.minimum(b, recent)
    return ctx, b, n_recent, n_sinks


@triton.jit
def _write_kept(out, key, pos, thr, need, n_sel, n_eq):
    """Compaction of one chunk: positions with key > thr, and keys == thr while fewer than ``need`` were taken
    (``n_eq`` of them in earlier chunks), to ``out[n_sel ..]`` in ascending order; returns the updated counts."""
    eq = (key == thr).to(tl.int32)
    eq_rank = n_eq + tl.cumsum(eq, 0) - eq
    sel = (key > thr) | ((eq == 1) & (eq_rank < need))
    sel_i = sel.to(tl.int32)
    dst = n_sel + tl.cumsum(sel_i, 0) - sel_i
    tl.store(out + dst, pos, mask=sel)
    return n_sel + tl.sum(sel_i, 0), n_eq + tl.sum(eq, 0)


@triton.jit(do_not_specialize=["recent", "N"])
def _select_resident_kernel(indices, scores, ctx_lens, budget, recent, N, stride_sj, stride_sh, stride_ij, stride_ih,
                            head_recent, head_sinks, BLOCK: tl.constexpr, OUT_BLOCK: tl.constexpr,
                            HEAD_SPLIT: tl.constexpr):
    j = tl.program_id(0)
    h = tl.program_id(1)
    ctx, b, n_recent, n_sinks = _row_setup(ctx_lens, budget, recent, N, head_recent, head_sinks, j, h, HEAD_SPLIT)
    if b <= 0:
        return
    pos = tl.arange(0, BLOCK)
    key = _key(scores + j.to(tl.int64) * stride_sj + h * stride_sh, pos, ctx, n_recent, n_sinks)  # [BLOCK]
    n_forced = n_recent + n_sinks  # disjoint (n_sinks + n_recent <= b <= ctx), all kept
    free = tl.where(key == 0x7F800000, -1, key)  # the scored (not forced) keys; -1 elsewhere
    # invariant: count(key >= lo) >= b > count(key >= hi); lo = the smallest scored key holds (every valid key is
    # >= it: ctx >= b), hi = the largest + 1 holds unless the forced alone fill b (then T is the forced key itself)
    lo = tl.min(tl.where(free >= 0, free, 0x7F800000), 0)
    hi = tl.max(free, 0) + 1
    cnt_lo = ctx
    lo = tl.where(n_forced >= b, 0x7F800000, lo)
    hi = tl.where(n_forced >= b, 0x7F800001, hi)
    while (hi - lo > 1) & (cnt_lo != b):  # exactly b keys >= lo: they are the kept set, stop early
        mid = lo + (hi - lo) // 2
        cnt = tl.sum((key >= mid).to(tl.int32), 0)
        up = cnt >= b
        lo = tl.where(up, mid, lo)
        cnt_lo = tl.where(up, cnt, cnt_lo)
        hi = tl.where(up, hi, mid)
    # T = lo: count(key > T) <= b <= count(key >= T); the lowest `need` positions with key == T are kept
    need = b - tl.sum((key > lo).to(tl.int32), 0)
    # the compaction re-reads the row (from L2) in OUT_BLOCK chunks: its scans' temporaries on the whole resident
    # row took 128 registers a thread at 4 warps and spilled 200 bytes at 16 warps (ptxas -v, sm_90)
    out = indices + j.to(tl.int64) * stride_ij + h * stride_ih
    row = scores + j.to(tl.int64) * stride_sj + h * stride_sh
    n_sel = b * 0
    n_eq = b * 0
    offs = tl.arange(0, OUT_BLOCK)
    for s0 in range(0, ctx, OUT_BLOCK):
        p = s0 + offs
        n_sel, n_eq = _write_kept(out, _key(row, p, ctx, n_recent, n_sinks), p, lo, need, n_sel, n_eq)


@triton.jit(do_not_specialize=["recent", "N"])
def _select_radix_kernel(indices, scores, ctx_lens, budget, recent, N, stride_sj, stride_sh, stride_ij, stride_ih,
                         head_recent, head_sinks, BLOCK: tl.constexpr, HEAD_SPLIT: tl.constexpr):
    # pass p builds a 256-bin histogram of the p-th 8-bit digit over the keys whose higher digits equal the prefix
    # found so far; the digit at which the count from the top reaches the number still needed extends the prefix
    j = tl.program_id(0)
    h = tl.program_id(1)
    ctx, b, n_recent, n_sinks = _row_setup(ctx_lens, budget, recent, N, head_recent, head_sinks, j, h, HEAD_SPLIT)
    if b <= 0:
        return
    row = scores + j.to(tl.int64) * stride_sj + h * stride_sh
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    # keys + 1 lie in [1, 0x7F800001] for valid positions: non-negative int32, four 8-bit digits
    prefix = b * 0
    need = b  # how many keys >= the final threshold are still to be taken among those matching the prefix
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], dtype=tl.int32)
        for s0 in range(0, ctx, BLOCK):
            pos = s0 + offs
            k1 = _key(row, pos, ctx, n_recent, n_sinks) + 1
            use = pos < ctx
            if shift < 24:
                use = use & ((k1 >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram((k1 >> shift) & 255, 256, mask=use)
        above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # keys with a larger digit
        d = tl.max(tl.where(above + hist >= need, bins, -1), 0)  # the largest digit reaching `need` from the top
        need = need - tl.sum(tl.where(bins == d, above, 0), 0)
        prefix = prefix | (d << shift)
    thr = prefix - 1  # the b-th largest key; `need` of the keys equal to it are kept, the lowest positions
    out = indices + j.to(tl.int64) * stride_ij + h * stride_ih
    n_sel = b * 0
    n_eq = b * 0
    for s0 in range(0, ctx, BLOCK):
        pos = s0 + offs
        n_sel, n_eq = _write_kept(out, _key(row, pos, ctx, n_recent, n_sinks), pos, thr, need, n_sel, n_eq)


def select_pillars_triton(scores, ctx_lens, budget, recent, max_budget, block: int | None = None, sinks=None,
                          method: str | None = None):
    """``recent``: an int (every row and head), or with ``sinks`` two [Rv, Hkv] int32 tensors (the hybrid split).
    ``method``: "resident" or "radix" (tests, sweeps); by default the resident kernel for rows of <= RESIDENT_MAX
    keys. ``block``: the radix kernel's chunk."""
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    head_split = isinstance(recent, torch.Tensor)
    Rv, Hkv, N = scores.shape
    indices = torch.zeros(Rv, Hkv, max_budget, dtype=torch.int32, device=scores.device)
    lengths = torch.minimum(budget.to(torch.int32), ctx_lens.to(torch.int32).clamp(max=N)).clamp(min=0)
    if Rv == 0 or N == 0:
        return indices, lengths
    method = method or ("resident" if N <= RESIDENT_MAX else "radix")
    if method not in ("resident", "radix"):
        raise ValueError(f"method must be 'resident' or 'radix', got {method!r}")
    head_recent = recent.to(torch.int32).contiguous() if head_split else lengths  # dummies when not HEAD_SPLIT
    head_sinks = sinks.to(torch.int32).contiguous() if head_split else lengths
    args = (indices, scores, ctx_lens, budget, 0 if head_split else int(recent), N, scores.stride(0),
            scores.stride(1), indices.stride(0), indices.stride(1), head_recent, head_sinks)
    if method == "resident":
        blk = max(32, triton.next_power_of_2(N))
        if blk > RESIDENT_MAX:
            raise ValueError(f"the resident select holds rows of <= {RESIDENT_MAX} keys, got {N}")
        warps = 1 if interpreting() else max(1, min(16, blk // 1024))  # 32 keys a thread
        _select_resident_kernel[(Rv, Hkv)](*args, BLOCK=blk, OUT_BLOCK=min(blk, 64 if interpreting() else 256 * warps),
                                           HEAD_SPLIT=head_split, num_warps=warps)
    else:
        blk = block or (64 if interpreting() else min(2048, max(256, triton.next_power_of_2(N))))
        _select_radix_kernel[(Rv, Hkv)](*args, BLOCK=blk, HEAD_SPLIT=head_split,
                                        num_warps=1 if interpreting() else (8 if blk >= 2048 else 4))
    return indices, lengths
