"""Triton kernel of :func:`unified_attention`: one launch for a mixed ragged batch, plus a split-KV reduction.

Program ``(qblock, kv_head, split)``: ``BLOCK_Q`` query tokens of one request times the ``GROUP`` query heads of
one KV head, flattened into ``BLOCK_M = BLOCK_Q * GROUP_PAD`` rows of one ``tl.dot`` — so every K/V tile is loaded
once for the whole GQA group. The program walks a *virtual key range*: for a full row the positions
``0 .. last``; for a sparse (PillarAttn) row the pillar list followed by ``draft_start .. last``. Each key's page
comes from the block table, so full and sparse rows share one loop and one launch. Long contexts with few
programs are cut into ``num_splits`` slices whose partial (acc, max, sum) a second kernel merges
(flash-decoding).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._validate import interpreting

# Kernels write log2(e) = 1.4426950408889634 and ln(2) = 0.6931471805599453 as literals: a plain global is
# not visible inside @triton.jit, and a tl.constexpr global breaks the interpreter (triton 3.7).



@triton.jit
def _find_request(query_start_loc, R, qblock, BLOCK_Q: tl.constexpr):
    """Request owning q-block ``qblock``: request r's blocks start at ``qsl[r] // BLOCK_Q + r`` (vLLM's layout)."""
    lo = R * 0  # a tensor from the start: loop-carried values keep one type
    hi = R - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(query_start_loc + mid) // BLOCK_Q + mid
        if start <= qblock:
            lo = mid
        else:
            hi = mid - 1
    return lo


# runtime ints that vary per step are not specialised (no recompiles when a count crosses 1 or a multiple of 16)
@triton.jit(do_not_specialize=["R", "T_pad", "num_splits", "max_pillars", "sliding_window", "seq_bucket"])
def _attn_kernel(
    out, lse, part_acc, part_m, part_l,
    q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
    is_sparse, draft_start, pillar_indices, pillar_lengths, pillar_rows,
    R, T_pad, num_splits, max_pillars, scale, softcap, sliding_window, seq_bucket,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cp, stride_co, stride_ch, stride_bt, stride_pr, stride_ph,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    SPLIT_KV: tl.constexpr, HAS_SPARSE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    qblock = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    r = _find_request(query_start_loc, R, qblock, BLOCK_Q)
    q_start = tl.load(query_start_loc + r)
    q_len = tl.load(query_start_loc + r + 1) - q_start
    qb = qblock - (q_start // BLOCK_Q + r)  # q-block index inside the request
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + r)
    pos0 = seq_len - q_len  # position of the request's first query

    offs_m = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + offs_m // GROUP_PAD  # query index inside the request
    g = offs_m % GROUP_PAD
    row_ok = (tok < q_len) & (g < GROUP)
    head = kvh * GROUP + g
    qpos = pos0 + tok
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    qrow = (q_start + tok).to(tl.int64)
    qt = tl.load(q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:  # the interpreter's fp16/bf16 arithmetic is unreliable: compute in fp32 there
        qt = qt.to(tl.float32)

    last = tl.minimum(pos0 + qb * BLOCK_Q + BLOCK_Q, seq_len) - 1  # last query position in this block
    n_pil = 0
    dstart = 0
    lo = 0
    if HAS_SPARSE:
        sp = tl.load(is_sparse + r) != 0
        pil_row = tl.load(pillar_rows + r).to(tl.int64)  # the request's row in the pillar store
        n_pil = tl.where(sp, tl.minimum(tl.load(pillar_lengths + pil_row), max_pillars), 0)  # never read past Bmax
        dstart = tl.where(sp, tl.load(draft_start + r), 0)
    if USE_WINDOW:  # full rows skip the keys below the first query's window
        lo = tl.maximum(pos0 + qb * BLOCK_Q - sliding_window + 1, 0)
        if HAS_SPARSE:
            lo = tl.where(sp, 0, lo)
    n_virtual = n_pil + tl.maximum(last + 1 - dstart, 0)  # pillars, then draft_start .. last (full: 0 .. last)
    per_split = tl.cdiv(tl.cdiv(n_virtual - lo, BLOCK_N), num_splits) * BLOCK_N
    j_begin = lo + split * per_split
    j_end = tl.minimum(n_virtual, j_begin + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    pil_base = pillar_indices + kvh * stride_ph
    if HAS_SPARSE:
        pil_base += pil_row * stride_pr
    bt_base = block_tables + r.to(tl.int64) * stride_bt
    for start in range(j_begin, j_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < j_end
        if HAS_SPARSE:
            is_pil = j < n_pil
            pil = tl.load(pil_base + j, mask=j_ok & is_pil, other=0)
            pos = tl.where(is_pil, pil, dstart + j - n_pil)
        else:
            pos = j
        page = tl.load(bt_base + pos // PAGE_SIZE, mask=j_ok, other=0).to(tl.int64)
        kv_off = page * stride_cp + (pos % PAGE_SIZE) * stride_co + kvh * stride_ch  # [BLOCK_N]
        kt = tl.load(k_cache + kv_off[None, :] + offs_d[:, None], mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(qt, kt, input_precision=DOT_PREC) * scale  # [BLOCK_M, BLOCK_N]
        if USE_SOFTCAP:  # softcap * tanh(s / softcap), tanh through exp2 (no tanh in every triton version)
            e = tl.exp2((2.0 * 1.4426950408889634 / softcap) * s)
            s = softcap * (1.0 - 2.0 / (e + 1.0))
        s = s * 1.4426950408889634
        ok = row_ok[:, None] & j_ok[None, :] & (pos[None, :] <= qpos[:, None])
        if USE_WINDOW:
            ok = ok & (pos[None, :] > qpos[:, None] - sliding_window)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_cache + kv_off[:, None] + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            vt = vt.to(tl.float32)
        else:
            p = p.to(vt.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=DOT_PREC)
        m_i = m_new

    out_mask = row_ok[:, None] & d_ok[None, :]
    if not SPLIT_KV:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out + qrow[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out.dtype.element_ty), mask=out_mask)
        lse_v = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse + qrow * (GROUP * tl.num_programs(1)) + head, lse_v, mask=row_ok)
    else:  # partials [num_splits, T_pad, Hq, (D)]; merged by _merge_kernel
        Hq = GROUP * tl.num_programs(1)
        prow = (split * T_pad + qrow) * Hq + head  # [BLOCK_M]
        tl.store(part_acc + prow[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(part_m + prow, m_i, mask=row_ok)
        tl.store(part_l + prow, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["R", "T_pad", "num_splits"])
def _merge_kernel(out, lse, part_acc, part_m, part_l, query_start_loc, R, T_pad, num_splits, stride_ot, stride_oh,
                  HQ: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  SPLITS_PAD: tl.constexpr):
    # program (token, block of BLOCK_H heads): 1 head on the GPU (registers), all heads in the interpreter
    t = tl.program_id(0)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dd = tl.arange(0, BLOCK_D)
    o_ptr = out + t.to(tl.int64) * stride_ot + hh[:, None] * stride_oh + dd[None, :]
    o_mask = (hh[:, None] < HQ) & (dd[None, :] < HEAD_DIM)
    if t >= tl.load(query_start_loc + R):  # padding tokens: zeros and -inf, written here (out / lse are not filled)
        tl.store(o_ptr, tl.zeros([BLOCK_H, BLOCK_D], tl.float32).to(out.dtype.element_ty), mask=o_mask)
        tl.store(lse + t.to(tl.int64) * HQ + hh, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=hh < HQ)
        return
    sp = tl.arange(0, SPLITS_PAD)[:, None]
    h = hh[None, :]
    ok = (sp < num_splits) & (h < HQ)
    prow = (sp * T_pad + t) * HQ + h  # [SPLITS_PAD, BLOCK_H]
    m = tl.load(part_m + prow, mask=ok, other=float("-inf"))
    l = tl.load(part_l + prow, mask=ok, other=0.0)
    m_max = tl.max(m, 0)  # [BLOCK_H]
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe[None, :])  # splits that saw nothing have m = -inf: weight 0
    l_sum = tl.sum(w * l, 0)
    l_safe = tl.where(l_sum > 0, l_sum, 1.0)
    d = tl.arange(0, BLOCK_D)[None, None, :]
    a = tl.load(part_acc + prow[:, :, None] * HEAD_DIM + d, mask=ok[:, :, None] & (d < HEAD_DIM), other=0.0)
    o = tl.sum(a * w[:, :, None], 0) / l_safe[:, None]  # [BLOCK_H, BLOCK_D]
    tl.store(o_ptr, o.to(out.dtype.element_ty), mask=o_mask)
    tl.store(lse + t.to(tl.int64) * HQ + hh, tl.where(l_sum > 0, (m_max + tl.log2(l_safe)) * 0.6931471805599453, float("-inf")),
             mask=hh < HQ)


def _tuning_configs():
    # Decode is bound by the gathered K/V loads: key-tile width, warps and prefetch depth decide how many bytes are
    # in flight. Chosen by a sweep on the H200 (bench/attn_sweep.py, bench/RESULTS.md): SmolLM2 (d64) decode at
    # B 64 is fastest with N64/2 warps/4 stages up to L 4k and N128/4/4 at 8k; the mixed draft + verify step with
    # N128/4/2; Qwen3-8B (d128) with N64/4/4. The old pair (N64w4s3, N128w8s2) was 0.50-0.62 of the floor on
    # SmolLM2 decode where these reach 0.64-0.86. Each config compiles per variant (~2-4 s): four only.
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in ((64, 2, 4), (128, 4, 4), (128, 4, 2), (64, 4, 4))]


def _quick_bench(fn, quantiles=None):
    # autotuning runs once per shape key: 5 ms warm-up / 25 ms of repeats per config keeps a sweep short
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_attn_kernel_tuned = triton.autotune(
    configs=_tuning_configs(),
    key=["HEAD_DIM", "GROUP", "BLOCK_M", "SPLIT_KV", "HAS_SPARSE", "seq_bucket", "PAGE_SIZE", "num_splits"],
    do_bench=_quick_bench,
)(_attn_kernel)

_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so tests exercise the split path
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def plan_blocks(Hq: int, Hkv: int, max_query_len: int) -> tuple[int, int]:
    """(BLOCK_Q, GROUP_PAD): BLOCK_M = BLOCK_Q * GROUP_PAD rows, at least 16 (tl.dot's minimum), up to 64
    so a verify chunk (k + 1 = 9 queries) of a 4-head group fits one program and reads K/V once."""
    gp = triton.next_power_of_2(Hq // Hkv)
    bq_min = max(1, 16 // gp)
    bq = max(bq_min, min(triton.next_power_of_2(max(max_query_len, 1)), max(1, 64 // gp)))
    return bq, gp


def plan_splits(num_programs: int, max_seq_len: int, device: torch.device, head_dim: int = 128,
                min_keys: int = 512) -> int:
    """Split the keys until the grid has ``programs_per_sm`` programs per SM, keeping >= min_keys keys per split.

    A d64 program moves half the bytes per key of a d128 one, so it needs more programs in flight: measured on the
    H200 (bench/attn_sweep.py), SmolLM2 decode at B 64 (192 programs unsplit) was fastest at 4 splits up to L 4k
    and 8 at L 8k (0.64-0.86 of the floor vs 0.50-0.62 with the old 2-per-SM target), while Qwen3-8B (d128) at
    B 32 L 4k is within 3% from 1 to 4 splits."""
    programs_per_sm = 8 if head_dim <= 64 else 2
    if interpreting():  # tests: small, so they still exercise the split path, and few programs (interpreter time)
        min_keys, programs_per_sm = 16, 2
    target = programs_per_sm * _num_sms(device)
    if num_programs >= target or max_seq_len < 2 * min_keys:
        return 1
    want = min(math.ceil(target / num_programs), max_seq_len // min_keys, 32)
    return triton.next_power_of_2(want) if want > 1 else 1  # powers of two: few merge variants to compile


def unified_attention_triton(q, k_cache, v_cache, *, query_start_loc, seq_lens, block_tables, max_query_len,
                             max_seq_len, scale, softcap=0.0, sliding_window=-1, is_sparse=None, draft_start=None,
                             pillar_indices=None, pillar_lengths=None, pillar_rows=None, num_splits: int | None = None,
                             block_n: int | None = None, num_warps: int = 4, num_stages: int = 2):
    """Launcher; arguments as :func:`sparsespec_compile.kernels.unified_attention` (validated there).
    ``num_splits`` / ``block_n`` (with ``num_warps`` / ``num_stages``) override the plan and the tuner (tests,
    benchmarks)."""
    T, Hq, D = q.shape
    _, P, Hkv, _ = k_cache.shape
    R = seq_lens.shape[0]
    if T == 0 or R == 0:
        return (torch.zeros(T, Hq, D, dtype=q.dtype, device=q.device),
                torch.full((T, Hq), float("-inf"), dtype=torch.float32, device=q.device))
    bq, gp = plan_blocks(Hq, Hkv, max_query_len)
    n_qblocks = T // bq + R
    has_sparse = is_sparse is not None
    splits = num_splits or plan_splits(n_qblocks * Hkv if max_query_len > bq else R * Hkv, max_seq_len, q.device,
                                       head_dim=D)
    if num_splits is None and has_sparse and max_query_len > 1:
        # A mixed step (sparse drafts next to verify/prefill chunks): the drafts' key ranges are ~B_pillar long,
        # the full rows' max_seq_len, so the few verify programs set the time. Cap the keys per program at 512:
        # measured on the H200 (bench/attn_sweep.py), 57 SmolLM2 drafts + 7 verify chunks ran fastest at 4 splits
        # for L 2k and 8 for L 4k (0.032 / 0.044 ms vs 0.064 / 0.115 ms with the old 2,048-key cap).
        splits = max(splits, min(32, triton.next_power_of_2(triton.cdiv(max_seq_len, 512))))
    if splits > 1:  # the merge kernel writes every row, padding tokens included: no fill kernels (2 per layer,
        # 60 launches of a SmolLM2 step in the H200 profile)
        out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    else:  # one pass writes the real tokens' rows only
        out = torch.zeros(T, Hq, D, dtype=q.dtype, device=q.device)
        lse = torch.full((T, Hq), float("-inf"), dtype=torch.float32, device=q.device)
    if not has_sparse:  # dummies, never read (HAS_SPARSE is a constexpr)
        is_sparse = draft_start = pillar_lengths = pillar_rows = seq_lens
        pillar_indices = block_tables[:, None, :]
    elif pillar_rows is None:
        pillar_rows = torch.arange(R, device=q.device, dtype=torch.int32)
    if splits > 1:
        part_acc = torch.empty(splits, T, Hq, D, dtype=torch.float32, device=q.device)
        part_m = torch.empty(splits, T, Hq, dtype=torch.float32, device=q.device)
        part_l = torch.empty(splits, T, Hq, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_m = part_l = lse
    upcast = interpreting()
    args = (out, lse, part_acc, part_m, part_l, q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
            is_sparse, draft_start, pillar_indices, pillar_lengths, pillar_rows,
            R, T, splits, pillar_indices.shape[2], float(scale), float(softcap) if softcap > 0 else 1.0, int(sliding_window),
            triton.next_power_of_2(max(max_seq_len, 1)),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            pillar_indices.stride(0), pillar_indices.stride(1))
    meta = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), GROUP=Hq // Hkv, GROUP_PAD=gp, BLOCK_Q=bq,
                BLOCK_M=bq * gp, PAGE_SIZE=P, SPLIT_KV=splits > 1, HAS_SPARSE=has_sparse, USE_SOFTCAP=softcap > 0,
                USE_WINDOW=sliding_window > 0, UPCAST=upcast,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    grid = (n_qblocks, Hkv, splits)
    if upcast or block_n is not None:
        _attn_kernel[grid](*args, BLOCK_N=block_n or 16, num_warps=num_warps, num_stages=num_stages, **meta)
    else:
        _attn_kernel_tuned[grid](*args, **meta)
    if splits > 1:
        bh = triton.next_power_of_2(Hq) if upcast else 1
        _merge_kernel[(T, triton.cdiv(Hq, bh))](out, lse, part_acc, part_m, part_l, query_start_loc, R, T, splits,
                            out.stride(0), out.stride(1), HQ=Hq, BLOCK_H=bh, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
                            SPLITS_PAD=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out, lse
