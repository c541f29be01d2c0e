"""Triton kernels of sampling at temperature with top-k / top-p, without sorting the vocabulary.

The kept set of a row is a threshold on its scaled logits (sampling_reference.py defines it: ties at the cut kept,
-inf never). It is found by radix selection on the float's order-preserving 32-bit key (-0.0 merged with +0.0), and
every pass over the vocabulary is split across a 2-D grid (rows x chunks of CHUNK = 4096 tokens), so a pass is a
bandwidth-bound sweep of the logits, not one program per row looping over it. Per call, in launch order:

  1. sweep (rows x chunks): max / first argmax, sum exp(l - max), min, valid count; the Gumbel race for rows without
     a filter. 1 read of the logits.
  2. setup (rows): the row's stats and path; greedy and unfiltered rows are finished here (token and stats).
  3. count radix, 4 sweeps: the histogram (tl.histogram, int32 atomics: exact) of one 8-bit digit of the keys that
     match the digits found so far -> the K-th largest key, K = k (top-k) or CAP = 1024 (top-p alone). 4 reads.
  4. gather sweep: the tokens at or above it -> the row's candidate slots (CAPB = 2048), the mass above it and in all.
     1 read.
  5. final (rows): the candidates, read back in blocks of 256 (L2-resident slots); the top-p cut among them by an 8-level, 4-bit mass radix (fixed point
     int64, so sums do not depend on the slots' order); the race over the kept candidates; token and stats.
  6. only for rows whose nucleus holds more than the CAP largest tokens (flat rows), or whose candidates overflow the
     slots (tie groups, top-k > CAPB): a mass radix over the whole row, 8 sweeps of a 4-bit digit (16-bin fixed-point
     histograms, int64 atomics), then a race sweep and a combine. 9 reads. Other rows' programs return at once.
Greedy rows read their logits once (sweep 1) and return at once from every later kernel: they pay nothing for the
sampled rows beside them. Noise is a hash of (row seed, token index), regenerated where needed: bit-identical to the
reference's ``uniform``; every sum has a fixed order (chunk partials combined in chunk order, integer atomics), and
CHUNK does not depend on the batch: a row's token and stats depend on its logits, parameters and seed alone.

Bytes and expected H200 time (4.2 TB/s; bf16 logits, B 256 x 49,152 = 25.2 MB, one read 6.0 us; at 151,936 x3):
  * temperature only: 1 read (+ the race's hashing) ~ 10-20 us + ~16 near-empty launches (~2 us each in a graph)
    ~ 40-50 us; the sort-based path measured 0.208 ms, the one-program-per-row kernel 0.097 ms.
  * top-k 50, top-p 0.95 with nucleus <= 1024 (language-model rows), both: 6 reads (36 us) + histogram work + the
    in-register cut + launches ~ 70-110 us; measured for the sort: 0.49 (top-k), 1.61 (top-p), 0.51 (both) ms.
  * flat rows (randn top-p: nucleus ~ half the vocabulary): 15 reads (90 us) + the 16-bin histograms' compute
    (~16 compare-adds per token per pass) ~ 0.2-0.3 ms; the sort measured 1.61 ms (49k) and 4.59 ms (152k).
Scratch per row: CAPB x 8 bytes of candidates, 4 KB of count histograms, 1 KB of mass histograms. These are
estimates from the bytes and launch counts, not measurements (bench/sampler.py measures them).

``residual`` samples max(p - q, 0) for speculative verification in one pass over the target and draft rows (one
program per row: only the rejected verify rows, a few per request).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # tokens of one row per program of a sweep: fixed (never by batch), so a row's sums never depend on its batch
BLOCK = 1024  # tokens per step inside a chunk
CAP = 1024  # a top-p row's candidates: its CAP largest logits (a top-k row's: its k largest)
CAPB = 2048  # candidate slots per row (ties at the bound may need more than CAP; more than CAPB: the full-row path)
FIX = 2.0 ** 40  # fixed point of the mass histograms (integer atomics: the sums do not depend on the programs' order)
MAX_V = 1 << 23  # counts exact in float32, fixed-point masses below 2**63
# (tokens per sweep program, candidate bound, candidate slots) that bench/sampler.py's tune section times; the
# kernel tests run each bounds-checked in the interpreter (tests/kernels/test_sampling_triton.py)
TUNE_SHAPES = ((2048, 1024, 2048), (4096, 1024, 2048), (8192, 1024, 2048), (4096, 256, 512),
               (4096, 2048, 4096))
MODE_NAMES = ("greedy", "no filter", "candidates", "full-row race", "mass search")  # a row's path, by mode

# per-row state: fs [R, 16] float32, st [R, 32] int64
F_M = tl.constexpr(0)  # max l
F_Z = tl.constexpr(1)  # sum exp(l - m) over the row, from the first sweep's chunks
F_MN = tl.constexpr(2)  # min valid l
F_NV = tl.constexpr(3)  # valid tokens
F_TAU = tl.constexpr(4)  # full-row rows: tau (mode 3) or the top-k bound top-p searches above (mode 4)
F_TAU_FINAL = tl.constexpr(5)  # full-row rows: the kept set's threshold, for the last kernel
S_MODE = tl.constexpr(0)  # 0 greedy, 1 no filter (race of the first sweep), 2 candidates, 3 full-row race, 4 mass search
S_K = tl.constexpr(1)  # the count the count radix searches (k, or CAP for top-p alone)
S_CNT = tl.constexpr(2)  # count radix, level l: (prefix, need) at 2 + 2l, 3 + 2l, l = 0..4
S_MASS = tl.constexpr(12)  # mass radix, level l: (prefix, mass above) at 12 + 2l, 13 + 2l, l = 0..8
S_TARGET = tl.constexpr(30)  # mass radix target (fixed point)
NF = tl.constexpr(16)
NS = tl.constexpr(32)
NP = tl.constexpr(8)  # values per (row, chunk) of the sweeps' partials


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
    """U(0, 1) at counter ``idx`` of the stream ``key``: the reference's ``uniform``, (2j + 1) / 2**24 with j the
    hash's top 23 bits (exact in float32: never 1.0, so -log U > 0 and no race key is infinite)."""
    h = _mix32(_mix32(idx.to(tl.uint32)) ^ key)
    return ((h >> 8) | 1).to(tl.float32) * (1.0 / 16777216.0)


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
def _ukey(l):
    """float32 -> int64 in [0, 2**32) ordered like the float, -0.0 merged with +0.0 (they compare equal)."""
    l = tl.where(l == 0.0, 0.0, l)
    return _float_key(l).to(tl.int64) + 2147483648


@triton.jit
def _ukey_float(u):
    return _key_float((u - 2147483648).to(tl.int32))


@triton.jit
def _count_digit(h, prefix, need, shift):
    """Count radix step: h [256] counts of the next 8-bit digit among keys matching ``prefix``; ``need`` of them are
    still to be taken from the top -> the digit of the need-th largest key, in the prefix, and what remains."""
    bins = tl.arange(0, 256)
    h = h.to(tl.int64)
    above = tl.sum(h, 0) - tl.cumsum(h, 0)  # keys with a larger digit
    d = tl.max(tl.where(above + h >= need, bins, -1), 0)
    need = need - tl.sum(tl.where(bins == d, above, 0), 0)
    return prefix | (d.to(tl.int64) << shift), need


@triton.jit
def _mass_digit(h, prefix, above, target, shift):
    """Mass radix step: h [16] masses (fixed point) of the next 4-bit digit among keys matching ``prefix``, ``above``
    the mass of all larger keys -> the digit of the largest key whose upper set reaches ``target``. ``above`` -1: no
    key reaches it (only through rounding: top_p within ~1e-7 of 1), carried to the end."""
    b = tl.arange(0, 16)
    gt = tl.sum(h, 0) - tl.cumsum(h, 0)  # mass of larger digits
    d = tl.max(tl.where(above + gt + h >= target, b, -1), 0)
    new_above = tl.where((d >= 0) & (above >= 0), above + tl.sum(tl.where(b == d, gt, 0), 0), -1)
    return tl.where(d >= 0, prefix | (d.to(tl.int64) << shift), prefix), new_above


@triton.jit
def _race_block(l, kept, key, idx, offs, first, rk, ri, rl):
    """One block of a chunk's Gumbel race over the ``kept`` logits ``l`` (tokens ``idx``, the block's first token
    ``first``): the running winner's key ``rk``, token ``ri`` and logit ``rl``, replaced when this block's best key
    is larger (strictly: the first block wins a tie)."""
    race = tl.where(kept, l - tl.log(_exp_noise(key, idx)), float("-inf"))
    bk = tl.max(race, 0)
    bi = tl.argmax(race, 0)
    upd = bk > rk
    rl = tl.where(upd, tl.max(tl.where(offs == bi, l, float("-inf")), 0), rl)
    ri = tl.where(upd, bi + first, ri)
    return tl.maximum(rk, bk), ri, rl


@triton.jit
def _sweep_kernel(logits, stride_l, rows, inv_temp, top_k, top_p, greedy, seeds, parts, hist, mhist, counter, V, C,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr, FILTERS: tl.constexpr):
    """Sweep 1, program (row, chunk): max and first argmax, sum exp(l - chunk max), min, count; for rows without a
    filter the Gumbel race too. Zeroes the row's histograms and candidate counter (chunk 0). FILTERS False: no row
    has a filter (top_k, top_p None)."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    r64 = r.to(tl.int64)
    base = logits + tl.load(rows + r).to(tl.int64) * stride_l
    it = tl.load(inv_temp + r)
    g = tl.load(greedy + r) != 0
    race_on = ~g
    if FILTERS:
        race_on = race_on & (tl.load(top_k + r) >= V) & (tl.load(top_p + r) >= 1.0)
    key = _row_key(tl.load(seeds + r))
    offs = tl.arange(0, BLOCK)
    ninf = float("-inf")
    c0 = c * CHUNK
    m = tl.full((), ninf, tl.float32)
    am = tl.full((), 0, tl.int32)
    s = tl.full((), 0.0, tl.float32)
    mn = tl.full((), float("inf"), tl.float32)
    nv = tl.full((), 0, tl.int32)
    rk = tl.full((), ninf, tl.float32)
    ri = tl.full((), 0, tl.int32)
    rl = tl.full((), ninf, tl.float32)
    if g:  # a greedy row: the argmax alone
        for start in range(0, CHUNK, BLOCK):
            l = _load_row(base, c0 + start + offs, V, it, UPCAST)
            bm = tl.max(l, 0)
            am = tl.where(bm > m, tl.argmax(l, 0) + c0 + start, am)  # strictly greater: the first index on ties
            m = tl.maximum(m, bm)
    else:
        for start in range(0, CHUNK, BLOCK):
            idx = c0 + start + offs
            l = _load_row(base, idx, V, it, UPCAST)
            valid = l > ninf
            bm = tl.max(l, 0)
            am = tl.where(bm > m, tl.argmax(l, 0) + c0 + start, am)
            new_m = tl.maximum(m, bm)
            scale = tl.where(new_m == ninf, 0.0, tl.exp(m - new_m))
            s = s * scale + tl.sum(tl.where(valid, tl.exp(l - new_m), 0.0), 0)
            m = new_m
            mn = tl.minimum(mn, tl.min(tl.where(valid, l, float("inf")), 0))
            nv += tl.sum(valid.to(tl.int32), 0)
            if race_on:
                rk, ri, rl = _race_block(l, valid, key, idx, offs, c0 + start, rk, ri, rl)
    p = parts + (r64 * C + c) * NP
    tl.store(p + 0, m)
    tl.store(p + 1, s)
    tl.store(p + 2, mn)
    tl.store(p + 3, nv.to(tl.float32))  # (counts and indices below 2**23: exact in float32)
    tl.store(p + 4, am.to(tl.float32))
    tl.store(p + 5, rk)
    tl.store(p + 6, ri.to(tl.float32))
    tl.store(p + 7, rl)
    if c == 0:
        tl.store(hist + r64 * 1024 + tl.arange(0, 1024), tl.zeros((1024,), tl.int32))
        tl.store(mhist + r64 * 128 + tl.arange(0, 128), tl.zeros((128,), tl.int64))
        tl.store(counter + r, 0)


@triton.jit
def _setup_kernel(parts, top_k, top_p, greedy, seeds, fs, st, tokens, stats, V, C, CAP, CP: tl.constexpr,
                  FILTERS: tl.constexpr):
    """Program (row): the row's stats from sweep 1's chunks and its mode; greedy and unfiltered rows are done here."""
    r = tl.program_id(0)
    r64 = r.to(tl.int64)
    ninf = float("-inf")
    cs = tl.arange(0, CP)
    cm = cs < C
    p = parts + (r64 * C + cs) * NP
    m_c = tl.load(p + 0, mask=cm, other=ninf)
    s_c = tl.load(p + 1, mask=cm, other=0.0)
    mn_c = tl.load(p + 2, mask=cm, other=float("inf"))
    n_c = tl.load(p + 3, mask=cm, other=0.0)
    am_c = tl.load(p + 4, mask=cm, other=0.0)
    rk_c = tl.load(p + 5, mask=cm, other=ninf)
    ri_c = tl.load(p + 6, mask=cm, other=0.0)
    rl_c = tl.load(p + 7, mask=cm, other=ninf)
    m = tl.max(m_c, 0)
    first = tl.min(tl.where(m_c == m, cs, CP), 0)  # the first chunk holding the max: the first argmax
    am = tl.sum(tl.where(cs == first, am_c, 0.0), 0).to(tl.int64)
    z = tl.sum(tl.where(n_c > 0, s_c * tl.exp(m_c - m), 0.0), 0)
    mn = tl.min(mn_c, 0)
    nv = tl.sum(n_c, 0)
    rk = tl.max(rk_c, 0)
    rf = tl.min(tl.where(rk_c == rk, cs, CP), 0)
    ri = tl.sum(tl.where(cs == rf, ri_c, 0.0), 0).to(tl.int64)
    rl = tl.max(tl.where(cs == rf, rl_c, ninf), 0)
    if FILTERS:
        kk = tl.load(top_k + r)
        pp = tl.load(top_p + r)
    else:
        kk = tl.full((), 0, tl.int64) + V
        pp = tl.full((), 1.0, tl.float32)
    g = tl.load(greedy + r) != 0
    nvi = nv.to(tl.int64)
    race_on = (~g) & (kk >= V) & (pp >= 1.0)
    use_k = kk < nvi
    use_p = pp < 1.0
    flat = (nvi == 0) | (mn >= m)  # one distinct value (or none): everything is kept
    mode = tl.where(g, 0, tl.where(race_on, 1, tl.where(flat | ((~use_k) & (~use_p)), 3, 2)))
    kstar = tl.where(use_k, tl.maximum(kk, 1), tl.minimum(nvi, CAP))
    tau_all = tl.where(nvi > 0, mn, ninf)
    f = fs + r64 * NF
    tl.store(f + F_M, m)
    tl.store(f + F_Z, z)
    tl.store(f + F_MN, mn)
    tl.store(f + F_NV, nv)
    tl.store(f + F_TAU, tau_all)
    s = st + r64 * NS
    tl.store(s + S_MODE, mode.to(tl.int64))
    tl.store(s + S_K, kstar)
    tl.store(s + S_CNT, kstar * 0)
    tl.store(s + S_CNT + 1, kstar)
    if mode <= 1:
        u = _uniform(_row_key(tl.load(seeds + r)), tl.full((), 0, tl.int32) + V)
        tl.store(tokens + r, tl.where(g, am, ri))
        o = stats + r64 * 5
        tl.store(o + 0, m)
        tl.store(o + 1, tl.where(g, m, tau_all))
        tl.store(o + 2, tl.where(g, 1.0, z))
        tl.store(o + 3, tl.where(g, 1.0, tl.exp(rl - m) / tl.where(z > 0, z, 1.0)))
        tl.store(o + 4, u)


@triton.jit
def _count_kernel(logits, stride_l, rows, inv_temp, st, hist, V, LEVEL: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """Count radix pass LEVEL (0..3), program (row, chunk): the histogram of the key's 8-bit digit LEVEL among the
    keys matching the digits found so far (found here from the previous level's histogram, chunk 0 records them)."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    r64 = r.to(tl.int64)
    s = st + r64 * NS
    if tl.load(s + S_MODE) != 2:
        return
    bins = tl.arange(0, 256)
    if LEVEL == 0:
        prefix = tl.load(s + S_CNT)
    else:
        h = tl.load(hist + (r64 * 4 + LEVEL - 1) * 256 + bins)
        prefix, need = _count_digit(h, tl.load(s + S_CNT + 2 * (LEVEL - 1)), tl.load(s + S_CNT + 2 * LEVEL - 1),
                                    32 - 8 * LEVEL)
        if c == 0:
            tl.store(s + S_CNT + 2 * LEVEL, prefix)
            tl.store(s + S_CNT + 2 * LEVEL + 1, need)
    shift = 24 - 8 * LEVEL
    base = logits + tl.load(rows + r).to(tl.int64) * stride_l
    it = tl.load(inv_temp + r)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((256,), tl.int32)
    for start in range(0, CHUNK, BLOCK):
        l = _load_row(base, c * CHUNK + start + offs, V, it, UPCAST)
        u = _ukey(l)
        use = l > float("-inf")
        if LEVEL > 0:
            use = use & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
        acc += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=use)
    tl.atomic_add(hist + (r64 * 4 + LEVEL) * 256 + bins, acc, mask=acc > 0)


@triton.jit
def _gather_kernel(logits, stride_l, rows, inv_temp, fs, st, hist, parts, counter, cand_v, cand_i, V, C,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr, CAPB: tl.constexpr, UPCAST: tl.constexpr):
    """Program (row, chunk) of a candidate row: the count radix's last digit gives the bound ``c`` (the K-th largest
    key); the chunk's tokens at or above it go to the row's candidate slots (a counter hands out the slots; past
    CAPB they are counted, not written), and the chunk's mass at or above it and in all."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    r64 = r.to(tl.int64)
    s = st + r64 * NS
    if tl.load(s + S_MODE) != 2:
        return
    h = tl.load(hist + (r64 * 4 + 3) * 256 + tl.arange(0, 256))
    bound, need = _count_digit(h, tl.load(s + S_CNT + 6), tl.load(s + S_CNT + 7), 0)
    if c == 0:
        tl.store(s + S_CNT + 8, bound)
        tl.store(s + S_CNT + 9, need)
    m = tl.load(fs + r64 * NF + F_M)
    base = logits + tl.load(rows + r).to(tl.int64) * stride_l
    it = tl.load(inv_temp + r)
    offs = tl.arange(0, BLOCK)
    mass_c = tl.full((), 0.0, tl.float32)
    mass_all = tl.full((), 0.0, tl.float32)
    for start in range(0, CHUNK, BLOCK):
        idx = c * CHUNK + start + offs
        l = _load_row(base, idx, V, it, UPCAST)
        valid = l > float("-inf")
        sel = valid & (_ukey(l) >= bound)
        e = tl.where(valid, tl.exp(l - m), 0.0)
        mass_c += tl.sum(tl.where(sel, e, 0.0), 0)
        mass_all += tl.sum(e, 0)
        si = sel.to(tl.int32)
        n = tl.sum(si, 0)
        if n > 0:
            slot = tl.atomic_add(counter + r, n) + tl.cumsum(si, 0) - si
            ok = sel & (slot < CAPB)
            tl.store(cand_v + r64 * CAPB + slot, l, mask=ok)
            tl.store(cand_i + r64 * CAPB + slot, idx, mask=ok)
    p = parts + (r64 * C + c) * NP
    tl.store(p + 0, mass_c)
    tl.store(p + 1, mass_all)


@triton.jit
def _final_kernel(fs, st, parts, counter, cand_v, cand_i, top_k, top_p, seeds, tokens, stats, V, C, FIX,
                  CP: tl.constexpr, CAPB: tl.constexpr, FB: tl.constexpr):
    """Program (row) of a candidate row: the top-p cut among its candidates (<= CAPB values, in blocks of FB) by a
    mass radix (fixed-point sums: the slots' order does not matter), the race over the kept ones. A row whose nucleus is not among them, or whose
    candidates overflowed, is handed to the full-row path (mode 3: threshold known; mode 4: mass search first)."""
    r = tl.program_id(0)
    r64 = r.to(tl.int64)
    s = st + r64 * NS
    if tl.load(s + S_MODE) != 2:
        return
    ninf = float("-inf")
    f = fs + r64 * NF
    m = tl.load(f + F_M)
    mn = tl.load(f + F_MN)
    nvi = tl.load(f + F_NV).to(tl.int64)
    kk = tl.load(top_k + r)
    pp = tl.load(top_p + r)
    use_k = kk < nvi
    use_p = pp < 1.0
    bound = _ukey_float(tl.load(s + S_CNT + 8))
    cs = tl.arange(0, CP)
    pc = parts + (r64 * C + cs) * NP
    mass_c = tl.sum(tl.load(pc + 0, mask=cs < C, other=0.0), 0)
    mass_all = tl.sum(tl.load(pc + 1, mask=cs < C, other=0.0), 0)
    cnt = tl.load(counter + r)
    key = _row_key(tl.load(seeds + r))
    tau_k = tl.where(use_k, bound, mn)
    if cnt <= CAPB:
        jb = tl.arange(0, FB)
        cv = cand_v + r64 * CAPB
        ci = cand_i + r64 * CAPB
        zsum = tl.full((), 0, tl.int64)  # candidates' mass, fixed point: sums independent of the slots' order
        for j0 in range(0, cnt, FB):
            v = tl.load(cv + j0 + jb, mask=j0 + jb < cnt, other=ninf)
            zsum += tl.sum(tl.where(v > ninf, tl.exp(v - m) * FIX + 0.5, 0.0).to(tl.int64), 0)
        zk = tl.where(use_k, zsum.to(tl.float32), mass_all * FIX)  # top-k rows: the candidates are the top-k set
        target = tl.maximum((pp * zk).to(tl.int64), 1)  # (>= 1: a top-p of 0 keeps the top value, as the reference)
        prefix = tl.full((), 0, tl.int64)
        above = tl.full((), -1, tl.int64)
        if use_p:  # the mass radix over the candidates (8 levels of 4 bits, one pass over the slots each)
            b = tl.arange(0, 16)
            above = tl.full((), 0, tl.int64)
            for lev in tl.static_range(8):
                shift = 28 - 4 * lev
                h = tl.zeros((16,), tl.int64)
                for j0 in range(0, cnt, FB):
                    v = tl.load(cv + j0 + jb, mask=j0 + jb < cnt, other=ninf)
                    u = _ukey(v)
                    ef = tl.where(v > ninf, tl.exp(v - m) * FIX + 0.5, 0.0).to(tl.int64)
                    match = v > ninf
                    if lev > 0:
                        match = match & ((u >> (shift + 4)) == (prefix >> (shift + 4)))
                    d = ((u >> shift) & 15).to(tl.int32)
                    h += tl.sum(tl.where(match[:, None] & (d[:, None] == b[None, :]), ef[:, None], 0), 0)
                prefix, above = _mass_digit(h, prefix, above, target, shift)
        reached = use_p & (above >= 0)
        tau = tl.where(reached, _ukey_float(prefix), tau_k)
        # (not reached with every token searched a candidate: only through rounding, top_p within ~1e-7 of 1: keep
        # the top-k set, as the reference)
        full = use_p & (~reached) & (~use_k) & (tl.load(s + S_K) < nvi)
        if full:  # the nucleus holds more than the CAP largest tokens: the mass search over the whole row
            tl.store(s + S_MODE, tl.full((), 4, tl.int64))
            tl.store(s + S_TARGET, tl.maximum((pp * mass_all * FIX).to(tl.int64), 1))
            tl.store(s + S_MASS, tl.full((), 0, tl.int64))
            tl.store(s + S_MASS + 1, tl.full((), 0, tl.int64))
            tl.store(f + F_TAU, mn)
        else:
            zf = tl.full((), 0, tl.int64)
            best = tl.full((), ninf, tl.float32)
            win = tl.full((), 0, tl.int32) + V
            lt = tl.full((), ninf, tl.float32)
            for j0 in range(0, cnt, FB):
                jm = j0 + jb < cnt
                v = tl.load(cv + j0 + jb, mask=jm, other=ninf)
                ix = tl.load(ci + j0 + jb, mask=jm, other=0)
                kept = jm & (v > ninf) & (v >= tau)
                zf += tl.sum(tl.where(kept, tl.exp(v - m) * FIX + 0.5, 0.0).to(tl.int64), 0)
                race = tl.where(kept, v - tl.log(_exp_noise(key, ix)), ninf)
                bb = tl.max(race, 0)
                bw = tl.min(tl.where(kept & (race == bb), ix, V), 0)  # the first index on equal keys (argmax's)
                bl = tl.max(tl.where(kept & (ix == bw), v, ninf), 0)
                upd = (bb > best) | ((bb == best) & (bw < win))
                best = tl.where(upd, bb, best)
                win = tl.where(upd, bw, win)
                lt = tl.where(upd, bl, lt)
            z = zf.to(tl.float32) / FIX
            tl.store(tokens + r, win.to(tl.int64))
            o = stats + r64 * 5
            tl.store(o + 0, m)
            tl.store(o + 1, tau)
            tl.store(o + 2, z)
            tl.store(o + 3, tl.exp(lt - m) / tl.where(z > 0, z, 1.0))
            tl.store(o + 4, _uniform(key, tl.full((), 0, tl.int32) + V))
    else:  # more candidates than slots (ties at the bound, or a top-k beyond CAPB)
        goal = pp * tl.where(use_k, mass_c, mass_all)
        if use_p & (goal > 1.0):  # mass search above the top-k bound
            tl.store(s + S_MODE, tl.full((), 4, tl.int64))
            tl.store(s + S_TARGET, tl.maximum((goal * FIX).to(tl.int64), 1))
            tl.store(s + S_MASS, tl.full((), 0, tl.int64))
            tl.store(s + S_MASS + 1, tl.full((), 0, tl.int64))
            tl.store(f + F_TAU, tau_k)
        else:  # the threshold is known: the bound (top-k alone), or the max (a top-p the top token reaches)
            tl.store(s + S_MODE, tl.full((), 3, tl.int64))
            tl.store(f + F_TAU, tl.where(use_p, m, bound))


@triton.jit
def _mass_kernel(logits, stride_l, rows, inv_temp, fs, st, mhist, V, FIX, LEVEL: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """Mass radix pass LEVEL (0..7), program (row, chunk) of a mode-4 row: the mass exp(l - m) (fixed point) per
    4-bit digit LEVEL of the keys at or above the top-k bound that match the digits found so far."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    r64 = r.to(tl.int64)
    s = st + r64 * NS
    if tl.load(s + S_MODE) != 4:
        return
    b = tl.arange(0, 16)
    if LEVEL == 0:
        prefix = tl.load(s + S_MASS)
        above = tl.load(s + S_MASS + 1)
    else:
        h = tl.load(mhist + (r64 * 8 + LEVEL - 1) * 16 + b)
        prefix, above = _mass_digit(h, tl.load(s + S_MASS + 2 * (LEVEL - 1)), tl.load(s + S_MASS + 2 * LEVEL - 1),
                                    tl.load(s + S_TARGET), 32 - 4 * LEVEL)
        if c == 0:
            tl.store(s + S_MASS + 2 * LEVEL, prefix)
            tl.store(s + S_MASS + 2 * LEVEL + 1, above)
    if above >= 0:
        shift = 28 - 4 * LEVEL
        f = fs + r64 * NF
        m = tl.load(f + F_M)
        lo = tl.load(f + F_TAU)
        base = logits + tl.load(rows + r).to(tl.int64) * stride_l
        it = tl.load(inv_temp + r)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((16,), tl.int64)
        for start in range(0, CHUNK, BLOCK):
            l = _load_row(base, c * CHUNK + start + offs, V, it, UPCAST)
            u = _ukey(l)
            use = (l > float("-inf")) & (l >= lo)
            if LEVEL > 0:
                use = use & ((u >> (shift + 4)) == (prefix >> (shift + 4)))
            w = tl.where(use, tl.exp(l - m) * FIX + 0.5, 0.0).to(tl.int64)
            d = ((u >> shift) & 15).to(tl.int32)
            acc += tl.sum(tl.where(d[:, None] == b[None, :], w[:, None], 0), 0)
        tl.atomic_add(mhist + (r64 * 8 + LEVEL) * 16 + b, acc, mask=acc > 0)


@triton.jit
def _race_kernel(logits, stride_l, rows, inv_temp, seeds, fs, st, mhist, parts, V, C, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """Program (row, chunk) of a full-row row (mode 3, 4): the threshold (mode 4: the mass radix's last digit), then
    the chunk's race over the kept tokens and their mass."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    r64 = r.to(tl.int64)
    s = st + r64 * NS
    mode = tl.load(s + S_MODE)
    if (mode != 3) & (mode != 4):
        return
    f = fs + r64 * NF
    m = tl.load(f + F_M)
    tau = tl.load(f + F_TAU)
    if mode == 4:
        h = tl.load(mhist + (r64 * 8 + 7) * 16 + tl.arange(0, 16))
        prefix, above = _mass_digit(h, tl.load(s + S_MASS + 14), tl.load(s + S_MASS + 15), tl.load(s + S_TARGET), 0)
        # (no key reaching the target, only through rounding: keep everything above the top-k bound)
        tau = tl.where(above >= 0, tl.maximum(_ukey_float(prefix), tau), tau)
    if c == 0:
        tl.store(f + F_TAU_FINAL, tau)
    base = logits + tl.load(rows + r).to(tl.int64) * stride_l
    it = tl.load(inv_temp + r)
    key = _row_key(tl.load(seeds + r))
    offs = tl.arange(0, BLOCK)
    ninf = float("-inf")
    rk = tl.full((), ninf, tl.float32)
    ri = tl.full((), 0, tl.int32)
    rl = tl.full((), ninf, tl.float32)
    z = tl.full((), 0.0, tl.float32)
    c0 = c * CHUNK
    for start in range(0, CHUNK, BLOCK):
        idx = c0 + start + offs
        l = _load_row(base, idx, V, it, UPCAST)
        kept = (l > ninf) & (l >= tau)
        z += tl.sum(tl.where(kept, tl.exp(l - m), 0.0), 0)
        rk, ri, rl = _race_block(l, kept, key, idx, offs, c0 + start, rk, ri, rl)
    p = parts + (r64 * C + c) * NP
    tl.store(p + 0, rk)
    tl.store(p + 1, ri.to(tl.float32))
    tl.store(p + 2, rl)
    tl.store(p + 3, z)


@triton.jit
def _race_final_kernel(fs, st, parts, seeds, tokens, stats, V, C, CP: tl.constexpr):
    """Program (row) of a full-row row: the race winner of its chunks (the first chunk on equal keys), its stats."""
    r = tl.program_id(0)
    r64 = r.to(tl.int64)
    s = st + r64 * NS
    mode = tl.load(s + S_MODE)
    if (mode != 3) & (mode != 4):
        return
    ninf = float("-inf")
    cs = tl.arange(0, CP)
    cm = cs < C
    p = parts + (r64 * C + cs) * NP
    rk_c = tl.load(p + 0, mask=cm, other=ninf)
    ri_c = tl.load(p + 1, mask=cm, other=0.0)
    rl_c = tl.load(p + 2, mask=cm, other=ninf)
    z = tl.sum(tl.load(p + 3, mask=cm, other=0.0), 0)
    rk = tl.max(rk_c, 0)
    rf = tl.min(tl.where(rk_c == rk, cs, CP), 0)
    ri = tl.sum(tl.where(cs == rf, ri_c, 0.0), 0).to(tl.int64)
    rl = tl.max(tl.where(cs == rf, rl_c, ninf), 0)
    f = fs + r64 * NF
    m = tl.load(f + F_M)
    tl.store(tokens + r, ri)
    o = stats + r64 * 5
    tl.store(o + 0, m)
    tl.store(o + 1, tl.load(f + F_TAU_FINAL))
    tl.store(o + 2, z)
    tl.store(o + 3, tl.exp(rl - m) / tl.where(z > 0, z, 1.0))
    tl.store(o + 4, _uniform(_row_key(tl.load(seeds + r)), tl.full((), 0, tl.int32) + V))


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
        if x.dim() != 2 or x.stride(-1) != 1 or not x.dtype.is_floating_point:
            raise ValueError(f"logits must be float [rows, V] with unit stride along V, got {x.dtype} "
                             f"{tuple(x.shape)} strides {x.stride()}")


def _per_row(n: int, **vectors: tuple[torch.Tensor, tuple[torch.dtype, ...]]) -> list[torch.Tensor]:
    """Per-row inputs as contiguous [n] of the dtypes the kernels read them as (a pointer's dtype is the kernel's
    element type: an int32 seed would hash differently from the reference's int64, a float64 inverse temperature
    would promote every logit). A strided view of a few hundred elements costs one tiny copy."""
    out = []
    for name, (v, dtypes) in vectors.items():
        if v.dim() != 1 or v.shape[0] != n or v.dtype not in dtypes:
            raise ValueError(f"{name} must be a [{n}] tensor of {' or '.join(map(str, dtypes))}, got {v.dtype} "
                             f"{tuple(v.shape)}")
        out.append(v.contiguous())
    return out


_INDEX = (torch.int64, torch.int32)


def _check_stats(name: str, stats: torch.Tensor, n: int) -> torch.Tensor:
    if stats.shape != (n, 5) or stats.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 [{n}, 5] (sample_rows' stats of each row), got {stats.dtype} "
                         f"{tuple(stats.shape)}")
    return stats.contiguous()


def sample_rows(logits: torch.Tensor, rows: torch.Tensor, inv_temp: torch.Tensor, top_k: torch.Tensor | None,
                top_p: torch.Tensor | None, greedy: torch.Tensor, seeds: torch.Tensor,
                need_stats: torch.Tensor | None = None, *, chunk: int | None = None, cap: int | None = None,
                capb: int | None = None, _modes: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [Rows, V] (any float dtype), rows [R] int64 (which logits row each output row reads), inv_temp [R] f32,
    top_k [R] int64 (>= V: off), top_p [R] f32 (1: off), greedy [R] bool, seeds [R] int64 ->
    (tokens [R] int64, stats [R, 5] f32 = (max l, tau, kept mass z, p(token), u)). No host sync: graph-capturable.
    ``u``: the row's uniform at counter V (verification's acceptance test reads it: no noise kernel of its own).
    ``top_k`` and ``top_p`` both None: no row has a filter (the caller knows it from its parameters, on the host):
    only the first sweep and the setup run, 2 launches instead of 17; on the H200 (B 256 x 151,936) the 15 others,
    every program returning at once, cost an estimated ~6 us each of the 363 us measured for temperature-only
    (from the top-k 50 and temperature times: not measured on its own).

    ``need_stats`` is accepted for the callers' sake and ignored: every row's stats cost nothing extra now.
    ``chunk`` / ``cap`` / ``capb``: the tokens per program of a sweep, the candidate bound of top-p and the candidate
    slots per row (defaults CHUNK, CAP, CAPB; tests shrink them to reach every path on small rows)."""
    _check_logits(logits)
    n, v = rows.shape[0], logits.shape[1]
    chunk, cap, capb = chunk or CHUNK, cap or CAP, capb or CAPB
    _check_shape(v, chunk, cap, capb)
    filters = top_k is not None
    if filters != (top_p is not None):
        raise ValueError("top_k and top_p must both be tensors or both be None (no row filters)")
    rows, inv_temp, greedy, seeds = _per_row(
        n, rows=(rows, _INDEX), inv_temp=(inv_temp, (torch.float32,)), greedy=(greedy, (torch.bool,)),
        seeds=(seeds, (torch.int64,)))
    if filters:
        top_k, top_p = _per_row(n, top_k=(top_k, _INDEX), top_p=(top_p, (torch.float32,)))
    dev = logits.device
    tokens = torch.empty(n, dtype=torch.int64, device=dev)
    stats = torch.empty(n, 5, dtype=torch.float32, device=dev)
    if n == 0:
        return tokens, stats
    # (never more than the row needs: the same for every batch of one vocabulary)
    chunk = min(chunk, max(16, triton.next_power_of_2(v)))
    capb = min(capb, max(16, triton.next_power_of_2(v)))
    cap = min(cap, capb)
    block = min(BLOCK, chunk)
    c = triton.cdiv(v, chunk)
    cp = triton.next_power_of_2(c)
    up = logits.dtype != torch.float32
    parts = torch.empty(n, c, 8, dtype=torch.float32, device=dev)
    fs = torch.empty(n, 16, dtype=torch.float32, device=dev)
    st = torch.empty(n, 32, dtype=torch.int64, device=dev)
    hist = torch.empty(n, 4, 256, dtype=torch.int32, device=dev)  # zeroed by the first sweep
    mhist = torch.empty(n, 8, 16, dtype=torch.int64, device=dev)
    counter = torch.empty(n, dtype=torch.int32, device=dev)
    cand_v = torch.empty(n, capb, dtype=torch.float32, device=dev)
    cand_i = torch.empty(n, capb, dtype=torch.int32, device=dev)
    row = (logits, logits.stride(0), rows, inv_temp)
    sweep = dict(CHUNK=chunk, BLOCK=block, UPCAST=up, num_warps=4)
    grid = (n, c)
    _sweep_kernel[grid](*row, top_k, top_p, greedy, seeds, parts, hist, mhist, counter, v, c, FILTERS=filters,
                        **sweep)
    _setup_kernel[(n,)](parts, top_k, top_p, greedy, seeds, fs, st, tokens, stats, v, c, cap, CP=cp,
                        FILTERS=filters, num_warps=1)
    if not filters:  # every row greedy or unfiltered: finished by the setup
        if _modes is not None:
            _modes.append(st[:, 0].clone())
        return tokens, stats
    for level in range(4):
        _count_kernel[grid](*row, st, hist, v, LEVEL=level, **sweep)
    _gather_kernel[grid](*row, fs, st, hist, parts, counter, cand_v, cand_i, v, c, CAPB=capb, **sweep)
    _final_kernel[(n,)](fs, st, parts, counter, cand_v, cand_i, top_k, top_p, seeds, tokens, stats, v, c, FIX, CP=cp,
                        CAPB=capb, FB=min(256, capb), num_warps=4)
    for level in range(8):
        _mass_kernel[grid](*row, fs, st, mhist, v, FIX, LEVEL=level, **sweep)
    _race_kernel[grid](*row, seeds, fs, st, mhist, parts, v, c, **sweep)
    _race_final_kernel[(n,)](fs, st, parts, seeds, tokens, stats, v, c, CP=cp, num_warps=1)
    if _modes is not None:  # (tests: which path each row took, MODE_NAMES)
        _modes.append(st[:, 0].clone())
    return tokens, stats


def _check_shape(v: int, chunk: int, cap: int, capb: int) -> None:
    """Every configuration the launcher accepts indexes only inside its buffers (the bench's tune section included)."""
    pow2 = lambda x: x > 0 and x & (x - 1) == 0  # noqa: E731
    if not (pow2(chunk) and chunk >= 16):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    if not (pow2(capb) and capb >= 16 and 1 <= cap <= capb):
        raise ValueError(f"need 1 <= cap <= capb, capb a power of two >= 16; got cap {cap}, capb {capb}")
    if not 1 <= v < MAX_V:
        raise ValueError(f"vocabulary {v} outside [1, {MAX_V})")


def residual(target_logits: torch.Tensor, target_rows: torch.Tensor, target_stats: torch.Tensor,
             draft_logits: torch.Tensor, draft_rows: torch.Tensor, draft_stats: torch.Tensor, inv_temp: torch.Tensor,
             seeds: torch.Tensor, need: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Writes ``out[r]`` ~ norm(max(p - q, 0)) of target row ``target_rows[r]`` and draft row ``draft_rows[r]`` (stats
    [R, 5] from ``sample_rows``) where ``need[r]``; other rows of ``out`` are left as they are."""
    _check_logits(target_logits, draft_logits)
    n = target_rows.shape[0]
    if not out.is_contiguous() or out.shape != (n,) or out.dtype != torch.int64:
        raise ValueError(f"out must be a contiguous int64 [{n}] tensor, got {out.dtype} {tuple(out.shape)}")
    target_rows, draft_rows, inv_temp, seeds, need = _per_row(
        n, target_rows=(target_rows, _INDEX), draft_rows=(draft_rows, _INDEX), inv_temp=(inv_temp, (torch.float32,)),
        seeds=(seeds, (torch.int64,)), need=(need, (torch.bool,)))
    target_stats, draft_stats = _check_stats("target_stats", target_stats, n), _check_stats("draft_stats",
                                                                                             draft_stats, n)
    if target_logits.shape[1] != draft_logits.shape[1] or target_logits.dtype != draft_logits.dtype:
        raise ValueError(f"target and draft logits must share V and dtype, got {target_logits.dtype} "
                         f"{tuple(target_logits.shape)} and {draft_logits.dtype} {tuple(draft_logits.shape)}")
    if not 1 <= target_logits.shape[1] < MAX_V:
        raise ValueError(f"vocabulary {target_logits.shape[1]} outside [1, {MAX_V})")
    if n:
        _residual_kernel[(n,)](target_logits, target_logits.stride(0), target_rows, target_stats, draft_logits,
                               draft_logits.stride(0), draft_rows, draft_stats, inv_temp, seeds, need, out,
                               target_logits.shape[1], BLOCK=BLOCK, UPCAST=target_logits.dtype != torch.float32)
    return out


__all__ = ["residual", "sample_rows"]
