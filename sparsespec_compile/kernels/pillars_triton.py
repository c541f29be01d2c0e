"""Triton kernel of :func:`pillar_scores` (the selection is in select_triton.py).

Scoring re-reads K of the verified context once per (request, KV head) and recomputes the verify queries'
probabilities from the saved log-sum-exp: ``exp(logit - lse)`` needs the *final* lse, which the attention
kernel only knows after its last key. Folding it into the attention pass would mean storing every verify row's
per-key probabilities (relative to the running max) and a second pass to rescale them: q_len x group floats per
key, written and read — fp32: 2 x 27 x 4 = 216 B a key for SmolLM2 (k = 8, group 3) against the 128 B of its K row
re-read here, 288 B against 256 B for Qwen3-8B (group 4, d 128). Only fp16 storage would move fewer bytes (108 /
144 B), and it would change the scores by more than fp32 rounding; so the two-pass form stays.
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
    # 0 async copies and 136-255 registers a thread at BLOCK_M 64 before; bench/ptxas_check.py compiles both)
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
    key=["HEAD_DIM", "GROUP", "BLOCK_M", "ONE_BLOCK", "seq_bucket", "work_bucket", "PAGE_SIZE"],
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
