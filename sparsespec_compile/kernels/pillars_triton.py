"""Triton kernels of :func:`pillar_scores` and :func:`select_pillars`.

Scoring re-reads K of the verified context once per (request, KV head) and recomputes the verify queries'
probabilities from the saved log-sum-exp: ``exp(logit - lse)`` needs the *final* lse, which the attention
kernel only knows after its last key, so fusing it would mean keeping raw logits (Hq * q_len floats per key,
more bytes than the K row itself) — the two-pass form moves fewer bytes.

Selection is a per-(row, head) radix select on the float bits of the scores (non-negative floats order like their
int32 bit patterns): four 8-bit histogram passes find the b-th largest key, one compaction pass writes the winners
in ascending position order (ties to the lower position, like the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import interpreting
from .tuning import autotune_cache_kwargs, launch_tuned



@triton.jit
def _verify_queries(q, lse, q_start, q0, q_len, offs_m, kvh, offs_d, d_ok, stride_qt, stride_qh, HQ: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, UPCAST: tl.constexpr):
    """Queries ``q0 ..`` of a verify row, the GQA group packed densely (row m = query m // GROUP, head m % GROUP, as
    the attention kernel packs them): [BLOCK_M, BLOCK_D] and their lse in log2 units. A row that attended nothing
    (lse -inf) or lies past the row / the block gets +inf, so it adds exactly 0 to every score."""
    tok = q0 + offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    ok = (tok < q_len) & (offs_m < BLOCK_Q * GROUP)
    qrow = (q_start + tok).to(tl.int64)
    qt = tl.load(q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                 mask=ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)
    lse_r = tl.load(lse + qrow * HQ + head, mask=ok, other=float("inf"))
    return qt, tl.where(lse_r == float("-inf"), float("inf"), lse_r) * 1.4426950408889634, tok


@triton.jit
def _tile_mass(qt, lse_r, tok, kt, pos, qpos0, scale, softcap, sliding_window, USE_SOFTCAP: tl.constexpr,
               USE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr):
    """Sum over the block's rows of exp(logit - lse) for each key of the tile: [BLOCK_N] fp32. Rows outside the
    block have lse +inf (exp2(-inf) = 0 exactly), so only the window needs a mask."""
    s = tl.dot(qt, kt, input_precision=DOT_PREC) * scale  # [BLOCK_M, BLOCK_N]
    if USE_SOFTCAP:
        e = tl.exp2((2.0 * 1.4426950408889634 / softcap) * s)
        s = softcap * (1.0 - 2.0 / (e + 1.0))
    p = tl.exp2(s * 1.4426950408889634 - lse_r[:, None])
    if USE_WINDOW:
        p = tl.where(pos[None, :] > (qpos0 + tok)[:, None] - sliding_window, p, 0.0)
    return tl.sum(p, 0)


@triton.jit(do_not_specialize=["max_ctx", "sliding_window", "seq_bucket", "work_bucket"])
def _scores_kernel(
    scores, q, k_cache, lse, query_start_loc, seq_lens, block_tables, rows,
    max_ctx, scale, softcap, sliding_window, seq_bucket, work_bucket,
    stride_qt, stride_qh, stride_cp, stride_co, stride_ch, stride_bt, stride_sj, stride_sh,
    HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
    PAGE_SIZE: tl.constexpr, ONE_BLOCK: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # program (scored row, KV head, chunk of TILES * BLOCK_N keys): every K tile is read once for the whole GQA
    # group and all verify queries (ONE_BLOCK: the launcher knows q_len <= BLOCK_Q, so the key loop has no inner
    # loop and Triton's pipeliner prefetches the next tiles with cp.async; a nested loop over q-blocks defeated it:
    # 0 async copies and 197-240 registers a thread at BLOCK_M 64 before, ptxas -v sm_90 — see bench/RESULTS.md)
    jrow = tl.program_id(0)
    kvh = tl.program_id(1)
    chunk = tl.program_id(2)
    r = tl.load(rows + jrow)
    q_start = tl.load(query_start_loc + r)
    q_len = tl.load(query_start_loc + r + 1) - q_start
    seq_len = tl.load(seq_lens + r)
    c = tl.minimum(seq_len - q_len, max_ctx)  # candidates: the context before the verify chunk
    base = chunk * (TILES * BLOCK_N)
    end = tl.minimum(base + TILES * BLOCK_N, max_ctx)
    out_row = scores + jrow.to(tl.int64) * stride_sj + kvh * stride_sh
    offs_n = tl.arange(0, BLOCK_N)
    # keys below every query's window score 0 without a load; keys >= c are -inf
    lo = base
    if USE_WINDOW:
        first = tl.maximum(tl.minimum(seq_len - q_len - sliding_window + 1, c), 0)  # the first key any query sees
        lo = tl.maximum(base, first // BLOCK_N * BLOCK_N)  # tile-aligned, like base
        for start in range(base, lo, BLOCK_N):
            pos = start + offs_n
            tl.store(out_row + pos, tl.zeros([BLOCK_N], tl.float32), mask=(pos < lo) & (pos < end))
    hi = tl.minimum(c, end)
    if hi > lo:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        offs_m = tl.arange(0, BLOCK_M)
        qt0, lse0, tok0 = _verify_queries(q, lse, q_start, 0, q_len, offs_m, kvh, offs_d, d_ok, stride_qt, stride_qh,
                                          HQ, GROUP, BLOCK_Q, UPCAST)
        inv = 1.0 / (q_len * GROUP).to(tl.float32)
        qpos0 = seq_len - q_len
        bt_base = block_tables + r.to(tl.int64) * stride_bt
        for start in range(lo, hi, BLOCK_N):
            pos = start + offs_n
            pos_ok = pos < hi
            page = tl.load(bt_base + pos // PAGE_SIZE, mask=pos_ok, other=0).to(tl.int64)
            kv_off = page * stride_cp + (pos % PAGE_SIZE) * stride_co + kvh * stride_ch
            kt = tl.load(k_cache + kv_off[None, :] + offs_d[:, None], mask=pos_ok[None, :] & d_ok[:, None],
                         other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            total = _tile_mass(qt0, lse0, tok0, kt, pos, qpos0, scale, softcap, sliding_window, USE_SOFTCAP,
                               USE_WINDOW, DOT_PREC)
            if not ONE_BLOCK:  # rows longer than a block (not a verify chunk the launcher was told of)
                for qb in range(BLOCK_Q, q_len, BLOCK_Q):
                    qt, lse_r, tok = _verify_queries(q, lse, q_start, qb, q_len, offs_m, kvh, offs_d, d_ok,
                                                     stride_qt, stride_qh, HQ, GROUP, BLOCK_Q, UPCAST)
                    total += _tile_mass(qt, lse_r, tok, kt, pos, qpos0, scale, softcap, sliding_window, USE_SOFTCAP,
                                        USE_WINDOW, DOT_PREC)
            tl.store(out_row + pos, tl.where(pos_ok, total * inv, float("-inf")), mask=pos < end)
        lo = lo + tl.cdiv(hi - lo, BLOCK_N) * BLOCK_N
    for start in range(tl.maximum(lo, hi), end, BLOCK_N):
        pos = start + offs_n
        tl.store(out_row + pos, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=pos < end)


# Keys per program = TILES * BLOCK_N, tuned per (context bucket, scored rows x KV heads): keys are scored
# independently (no merge), so the launch shape only trades parallelism against per-program fixed costs (Q and lse
# loads, metadata). Both ends measured slow on the H200 with the previous kernel: one 64-key tile per program at
# B 256, 4k contexts spent its time on metadata and Q loads (0.77 ms per step against ~0.27 ms of K bytes); 8 tiles
# per program at B 256, 512-token prompts left 84 programs for 132 SMs (16.8 us a layer against ~1.7 us of K
# bytes; bench/data/profile_k8_b256_prompt512_h200.txt). Which shape wins depends on how many (row, head, chunk)
# programs have keys, so the autotuner measures each shape on the step's own rows. num_stages 3: two K tiles in
# flight behind the one being used (16 KB each at N128, d64).
_SCORE_SHAPES = ((64, 2, 4, 3), (64, 4, 4, 3), (64, 8, 4, 3), (128, 1, 4, 3), (128, 2, 4, 3), (128, 4, 4, 3),
                 (128, 8, 4, 3), (64, 4, 2, 3))

_scores_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "TILES": t}, num_warps=w, num_stages=st) for bn, t, w, st in _SCORE_SHAPES],
    key=["HEAD_DIM", "BLOCK_M", "seq_bucket", "work_bucket", "PAGE_SIZE"],
    do_bench=lambda fn, quantiles=None: triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles),
    **autotune_cache_kwargs(),
)(_scores_kernel)


def score_blocks(group: int, max_query_len: int | None) -> tuple[int, int, bool]:
    """(BLOCK_Q, BLOCK_M, ONE_BLOCK) of the scoring launch. A verify chunk's queries times the GQA group, packed
    densely, fit one block of <= 64 rows when the launcher knows ``max_query_len`` (SmolLM2 k = 8: 9 x 3 = 27 rows
    in 32; Qwen3-8B: 9 x 4 = 36 in 64), so each K tile serves every query in one dot and one pass. The previous
    kernel padded the group to a power of two and used 16 queries a block (64 rows, 36 of them used for SmolLM2):
    2.4x the exponentials and 197-240 registers a thread. Without the bound (or past 64 rows) a block holds
    ``64 // group`` queries and the kernel loops over blocks per tile."""
    if max_query_len is not None and 1 <= max_query_len * group <= 64:
        return max_query_len, max(16, triton.next_power_of_2(max_query_len * group)), True
    bq = max(1, 64 // group)
    return bq, max(16, triton.next_power_of_2(bq * group)), False


def pillar_scores_triton(q, k_cache, *, query_start_loc, seq_lens, block_tables, rows, lse, scale, softcap=0.0,
                         sliding_window=-1, max_ctx, max_query_len: int | None = None, block_n: int | None = None,
                         tiles: int | None = None, out: torch.Tensor | None = None):
    """Launcher; arguments as :func:`sparsespec_compile.kernels.pillar_scores`. ``tiles`` (K tiles per program)
    and ``block_n`` fix the launch shape (sweeps; both default to the autotuned shape)."""
    T, Hq, D = q.shape
    _, P, Hkv, _ = k_cache.shape
    Rv = rows.shape[0]
    scores = torch.empty(Rv, Hkv, max_ctx, dtype=torch.float32, device=q.device) if out is None else out
    if Rv == 0 or max_ctx == 0:
        return scores
    group = Hq // Hkv
    bq, bm, one = score_blocks(group, max_query_len)
    seq_bucket, work_bucket = triton.next_power_of_2(max_ctx), triton.next_power_of_2(Rv * Hkv)
    args = (scores, q, k_cache, lse.contiguous(), query_start_loc, seq_lens, block_tables, rows, max_ctx,
            float(scale), float(softcap) if softcap > 0 else 1.0, int(sliding_window),
            seq_bucket, work_bucket, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), block_tables.stride(0), scores.stride(0), scores.stride(1))
    meta = dict(HQ=Hq, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), GROUP=group, BLOCK_Q=bq,
                BLOCK_M=bm, PAGE_SIZE=P, ONE_BLOCK=one, USE_SOFTCAP=softcap > 0, USE_WINDOW=sliding_window > 0,
                UPCAST=interpreting(), DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if interpreting() or block_n is not None or tiles is not None:
        bn = block_n or (16 if interpreting() else 64)
        tiles = tiles or 2
        _scores_kernel[(Rv, Hkv, triton.cdiv(max_ctx, bn * tiles))](*args, BLOCK_N=bn, TILES=tiles, num_warps=4,
                                                                     num_stages=3, **meta)
    else:
        grid = lambda m: (Rv, Hkv, triton.cdiv(max_ctx, m["BLOCK_N"] * m["TILES"]))  # noqa: E731
        variant = (str(q.dtype), str(k_cache.dtype)) + tuple(sorted(meta.items()))
        launch_tuned("pillar_scores", _scores_kernel_tuned, variant, (seq_bucket, work_bucket), grid, args, meta)
    return scores


@triton.jit
def _key(scores_row, pos, ctx, n_recent, n_sinks):
    """int32 ranking key: invalid -1 < valid score bits (non-negative floats order like ints) < forced (the newest
    ``n_recent`` and the first ``n_sinks`` positions: the hybrid draft's window and sinks; pillar: no sinks)."""
    s = tl.load(scores_row + pos, mask=pos < ctx, other=0.0).to(tl.float32)
    bits = tl.minimum(s.to(tl.int32, bitcast=True), 0x7F7FFFFF)  # +inf ranks as the largest finite; nan and <= 0 as 0
    key = tl.where(s > 0, bits, 0)
    key = tl.where((pos >= ctx - n_recent) | (pos < n_sinks), 0x7F800000, key)
    return tl.where(pos < ctx, key, -1)


# The b-th largest key is found by a radix select, 8 bits per pass from the top (RAFT's, which the reference
# implementation uses): pass p builds a 256-bin histogram of the p-th digit over the keys whose higher digits equal
# the prefix found so far, and the digit at which the count from the top reaches the number still needed extends
# the prefix. Four passes fix the threshold exactly; a fifth reads the row again to write the winners. There is one
# program per (row, KV head, layer); the time is the chain of dependent passes over the row, so five passes replace
# the 10-18 of a 4/16-way search (0.44 ms per B 256 step in the H200 profile) — see bench/RESULTS.md.
#
# The hybrid draft (kernels/hybrid.py) reuses this select with forced sinks and a per-(row, head) window:
# ``HEAD_SPLIT`` reads ``n_recent`` / ``n_sinks`` from [Rv, H] tensors instead of the scalar ``recent`` (sinks 0).
@triton.jit(do_not_specialize=["recent", "N"])
def _select_kernel(indices, scores, ctx_lens, budget, recent, N, stride_sj, stride_sh, stride_ij, stride_ih,
                   head_recent, head_sinks, BLOCK: tl.constexpr, HEAD_SPLIT: tl.constexpr):
    j = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.minimum(tl.load(ctx_lens + j).to(tl.int32), N)
    b = tl.minimum(tl.load(budget + j).to(tl.int32), ctx)
    if b <= 0:
        return
    if HEAD_SPLIT:
        n_sinks = tl.minimum(tl.load(head_sinks + j * tl.num_programs(1) + h).to(tl.int32), b)
        n_recent = tl.minimum(tl.load(head_recent + j * tl.num_programs(1) + h).to(tl.int32), b - n_sinks)
    else:
        n_sinks = b * 0
        n_recent = tl.minimum(b, recent)
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
        key = _key(row, pos, ctx, n_recent, n_sinks)
        eq = (key == thr).to(tl.int32)
        eq_rank = n_eq + tl.cumsum(eq, 0) - eq
        sel = (key > thr) | ((eq == 1) & (eq_rank < need))
        sel_i = sel.to(tl.int32)
        dst = n_sel + tl.cumsum(sel_i, 0) - sel_i
        tl.store(out + dst, pos, mask=sel)
        n_sel += tl.sum(sel_i, 0)
        n_eq += tl.sum(eq, 0)


def select_pillars_triton(scores, ctx_lens, budget, recent, max_budget, block: int | None = None, sinks=None):
    """``recent``: an int (every row and head), or with ``sinks`` two [Rv, Hkv] int32 tensors (the hybrid split)."""
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    head_split = isinstance(recent, torch.Tensor)
    Rv, Hkv, N = scores.shape
    indices = torch.zeros(Rv, Hkv, max_budget, dtype=torch.int32, device=scores.device)
    lengths = torch.minimum(budget.to(torch.int32), ctx_lens.to(torch.int32).clamp(max=N)).clamp(min=0)
    if Rv == 0 or N == 0:
        return indices, lengths
    blk = block or (64 if interpreting() else min(2048, max(256, triton.next_power_of_2(N))))
    head_recent = recent.to(torch.int32).contiguous() if head_split else lengths  # dummies when not HEAD_SPLIT
    head_sinks = sinks.to(torch.int32).contiguous() if head_split else lengths
    _select_kernel[(Rv, Hkv)](indices, scores, ctx_lens, budget, 0 if head_split else int(recent), N,
                              scores.stride(0), scores.stride(1), indices.stride(0), indices.stride(1),
                              head_recent, head_sinks, BLOCK=blk, HEAD_SPLIT=head_split,
                              num_warps=1 if interpreting() else (8 if blk >= 2048 else 4))
    return indices, lengths
