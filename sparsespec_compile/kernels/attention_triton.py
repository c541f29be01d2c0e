"""Triton kernel of :func:`unified_attention`: one work-balanced launch for a mixed ragged batch, merges included.

Program ``(item, kv_head)`` of the attention kernel reads one item of the step's :class:`AttentionPlan`: ``BLOCK_Q``
query tokens of one request times the ``GROUP`` query heads of one KV head, packed densely into the first
``BLOCK_Q * GROUP`` of the ``BLOCK_M`` rows of one ``tl.dot`` (every K/V tile is loaded once for the whole GQA
group), over one slice of the request's *virtual key range*: for a full row the positions ``lo .. last``; for a
sparse (PillarAttn) row the pillar list followed by ``draft_start .. last``. Each key's page comes from the block
table, so full and sparse rows share one loop and one launch. An item that covers its whole unit writes the output
itself; the slices of a cut unit write fp32 partials (acc, max, sum) and raise the unit's count in the plan's
counters, and the slice that completes the count combines them (``_merge_unit``) and resets the count. Programs past
the plan's items write the padding tokens' zeros / -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import interpreting
from .attention_plan import AttentionPlan
from .attention_plan_triton import plan_attention_triton
from .tuning import autotune_cache_kwargs, launch_tuned

# Kernels write log2(e) = 1.4426950408889634 and ln(2) = 0.6931471805599453 as literals: a plain global is
# not visible inside @triton.jit, and a tl.constexpr global breaks the interpreter (triton 3.7).


# runtime ints that vary per step are not specialised (no recompiles when a count crosses 1 or a multiple of 16)
@triton.jit(do_not_specialize=["n_items", "R", "num_tokens", "max_pillars", "sliding_window", "seq_bucket",
                            "work_bucket"])
def _attn_kernel(
    out, lse, part_acc, part_m, part_l, items, counters,
    q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
    is_sparse, draft_start, pillar_indices, pillar_lengths, pillar_rows,
    n_items, R, num_tokens, max_pillars, scale, softcap, sliding_window, seq_bucket, work_bucket,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cp, stride_co, stride_ch, stride_bt, stride_pr, stride_ph,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_SPARSE: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    item = tl.program_id(0)
    kvh = tl.program_id(1)
    if item >= n_items:  # past the plan's capacity: one block of BLOCK_Q padding tokens (out / lse are not filled)
        _zero_padding(out, lse, query_start_loc, R, num_tokens, (item - n_items) * BLOCK_Q, kvh, stride_ot, stride_oh,
                      HEAD_DIM, BLOCK_D, GROUP, BLOCK_Q, BLOCK_M)
        return
    rec = items + item * 4
    r = tl.load(rec)
    if r < 0:  # past the step's real items
        return
    qb = tl.load(rec + 1)
    chunk = tl.load(rec + 2)
    n_chunks = tl.load(rec + 3)
    q_start = tl.load(query_start_loc + r)
    q_len = tl.load(query_start_loc + r + 1) - q_start
    seq_len = tl.load(seq_lens + r)
    pos0 = seq_len - q_len  # position of the request's first query

    offs_m = tl.arange(0, BLOCK_M)
    tok = qb * BLOCK_Q + offs_m // GROUP  # query index inside the request
    g = offs_m % GROUP
    row_ok = (tok < q_len) & (offs_m < BLOCK_Q * GROUP)  # the block's last rows may be spare
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
    per_chunk = tl.cdiv(tl.cdiv(n_virtual - lo, BLOCK_N), n_chunks) * BLOCK_N
    j_begin = lo + chunk * per_chunk
    j_end = tl.minimum(n_virtual, j_begin + per_chunk)

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
    if n_chunks == 1:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(out + qrow[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out.dtype.element_ty), mask=out_mask)
        lse_v = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse + qrow * (GROUP * tl.num_programs(1)) + head, lse_v, mask=row_ok)
    else:  # partials [items, Hkv, BLOCK_M, (D)] of this item; the unit's last item to finish combines them
        Hkv = tl.num_programs(1)
        prow = (item.to(tl.int64) * Hkv + kvh) * BLOCK_M + offs_m  # [BLOCK_M]
        tl.store(part_acc + prow[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(part_m + prow, m_i, mask=row_ok)
        tl.store(part_l + prow, l_i, mask=row_ok)
        # every thread's partials are written before the count is raised (bar.sync, then a release at GPU scope)
        tl.debug_barrier()
        first = item - chunk
        cnt = counters + first.to(tl.int64) * Hkv + kvh
        if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == n_chunks - 1:
            tl.store(cnt, 0)  # no other item of the unit is left: back to 0 for the next layer
            _merge_unit(out, lse, part_acc, part_m, part_l, first, n_chunks, kvh, Hkv, offs_m, qrow, head, row_ok,
                        stride_ot, stride_oh, HEAD_DIM, BLOCK_D, BLOCK_M, GROUP)


@triton.jit
def _merge_unit(out, lse, part_acc, part_m, part_l, first, n_chunks, kvh, Hkv, offs_m, qrow, head, row_ok,
                stride_ot, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                GROUP: tl.constexpr):
    """Combine the partials of a cut unit's items ``first .. first + n_chunks`` (this program's among them) and write
    its rows. The loads bypass L1 (.cg): the other items' partials were written by other SMs during this launch.

    This was a second launch per layer (``_merge_kernel``): 8.8 us a layer in a B 256 x 4k k = 8 step, 6.6 in the
    stride-0 step (H200 profile, bench/data/profile_{k8,s0}_b256_prompt4096_h200.txt), mostly launch and tail for
    a few MB of L2-resident partials. Done by the last item of each unit it overlaps the other items' work."""
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM
    mask = row_ok[:, None] & d_ok[None, :]
    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for c in range(0, n_chunks):
        prow = ((first + c).to(tl.int64) * Hkv + kvh) * BLOCK_M + offs_m
        m_c = tl.load(part_m + prow, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        l_c = tl.load(part_l + prow, mask=row_ok, other=0.0, cache_modifier=".cg")
        a_c = tl.load(part_acc + prow[:, None] * HEAD_DIM + dd[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, m_c)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # slices that saw nothing have m = -inf: weight 0
        alpha = tl.exp2(m_run - m_safe)
        beta = tl.exp2(m_c - m_safe)
        l_run = l_run * alpha + l_c * beta
        acc = acc * alpha[:, None] + a_c * beta[:, None]
        m_run = m_new
    l_safe = tl.where(l_run > 0, l_run, 1.0)
    tl.store(out + qrow[:, None] * stride_ot + head[:, None] * stride_oh + dd[None, :],
             (acc / l_safe[:, None]).to(out.dtype.element_ty), mask=mask)
    tl.store(lse + qrow * (GROUP * Hkv) + head,
             tl.where(l_run > 0, (m_run + tl.log2(l_safe)) * 0.6931471805599453, float("-inf")), mask=row_ok)


@triton.jit
def _zero_padding(out, lse, query_start_loc, R, num_tokens, t0, kvh, stride_ot, stride_oh, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr):
    """Zeros and -inf for the padding tokens ``>= query_start_loc[R]`` among ``t0 .. t0 + BLOCK_Q``, KV head kvh."""
    offs_m = tl.arange(0, BLOCK_M)
    head = kvh * GROUP + offs_m % GROUP
    dd = tl.arange(0, BLOCK_D)
    t = t0 + offs_m // GROUP
    pad = (t >= tl.load(query_start_loc + R)) & (t < num_tokens) & (offs_m < BLOCK_Q * GROUP)
    trow = t.to(tl.int64)
    tl.store(out + trow[:, None] * stride_ot + head[:, None] * stride_oh + dd[None, :],
             tl.zeros([BLOCK_M, BLOCK_D], tl.float32).to(out.dtype.element_ty),
             mask=pad[:, None] & (dd < HEAD_DIM)[None, :])
    tl.store(lse + trow * (GROUP * tl.num_programs(1)) + head, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=pad)


def _tuning_configs():
    # Decode is bound by the gathered K/V loads: key-tile width, warps and prefetch depth decide how many bytes are
    # in flight. Chosen by a sweep on the H200 (bench/attn_sweep.py, bench/RESULTS.md): SmolLM2 (d64) decode at
    # B 64 is fastest with N64/2 warps/4 stages up to L 4k and N128/4/4 at 8k; the mixed draft + verify step with
    # N128/4/2; Qwen3-8B (d128) with N64/4/4. N64/8/2 uses the fewest registers a thread (ptxas -v, sm_90, with
    # the JIT's 16-divisible strides: 105 at BLOCK_M 16 and 166 at 64 for d64, against 120-156 and 197-255 for the
    # others; N64/2/4 spills at BLOCK_M 64), so more programs fit an SM. Each config compiles per variant (~2-4 s).
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in ((64, 2, 4), (128, 4, 4), (128, 4, 2), (64, 4, 4), (64, 8, 2))]


def _quick_bench(fn, quantiles=None):
    # autotuning runs once per shape key: 5 ms warm-up / 25 ms of repeats per config keeps a sweep short
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_attn_kernel_tuned = triton.autotune(
    configs=_tuning_configs(),
    # work_bucket (the plan's item capacity, a power of two): a 9-unit verify-only launch and a 32-row decode share
    # every other key, and a config tuned on the first was 1.17x slower on the second (H200, Qwen3-8B shape)
    key=["HEAD_DIM", "GROUP", "BLOCK_M", "HAS_SPARSE", "seq_bucket", "work_bucket", "PAGE_SIZE"],
    do_bench=_quick_bench,
    **autotune_cache_kwargs(),
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
    """(BLOCK_Q, BLOCK_M): a block holds BLOCK_Q query tokens times the GQA group of one KV head, packed densely into
    BLOCK_M >= 16 rows (tl.dot's minimum, a power of two); a group of 3 puts 5 queries in 16 rows, so a k + 1 = 9
    verify chunk is 2 units (reading its context twice), where padding the group to 4 made it 3 (4 + 4 + 1).

    Decode, draft and verify steps (every row <= 16 queries) use the smallest block: a verify chunk becomes a few
    units whose K/V re-reads hit L2, and no draft row pays for a 64-row block. On the H200 (bench/kernels.py step
    section) a steady k = 8 step was 0.86x (SmolLM2, B 256, L 4k) and 0.83x (Qwen3-8B, B 32, L 16k) the time with a
    64-row block, which needs 166-255 registers a thread where 16 rows need 105-156 (d64; ptxas -v, sm_90), so fewer
    programs fit an SM. Steps with a prefill chunk use up to 64 rows (compute-bound: each K/V tile serves more
    queries)."""
    group = Hq // Hkv
    bm = max(16, triton.next_power_of_2(group))
    if max_query_len > 16:
        bm = max(bm, min(64, triton.next_power_of_2(max_query_len * group)))
    return max(1, bm // group), bm


def block_rows(group: int, block_q: int) -> int:
    """BLOCK_M of a plan cut into ``block_q``-query units: the smallest power of two >= 16 holding them."""
    return max(16, triton.next_power_of_2(block_q * group))


def work_target(device: torch.device, head_dim: int, num_kv_heads: int,
                compute_bound: bool = False, mixed: bool = False) -> tuple[int, int]:
    """(target_items, min_chunk) of a launch's plan: enough ``(item, kv_head)`` programs to keep every SM's loads in
    flight, and no item shorter than ``min_chunk`` keys, where per-program fixed costs would dominate.

    A d64 program moves half the bytes per key of a d128 one, so it needs more programs in flight: on the H200
    (bench/attn_sweep.py) SmolLM2 decode at B 64, L 4k was fastest with 1,536 programs (12 per SM), Qwen3-8B (d128)
    decode within 3% from 2 to 8 per SM. ``mixed`` (a speculative step: sparse drafts beside full verify rows) takes
    8 for d128, because such rows are unequal: at 2 per SM a Qwen3-8B k = 8 step (B 32, L 16k) gets 5.2k-key verify
    items beside 0.8k-key drafts and the SMs holding verify items finish last (list-scheduling the items on 132 SMs:
    1.56x the balanced time, 1.05-1.13x at 8). Measured on the H200 (bench/RESULTS.md): that step 0.885 -> 0.856 ms,
    L 32k 1.656 -> 1.536 ms; plain decode at 8 per SM was 1.05-1.07x main's kernel, so it keeps 2.
    """
    programs_per_sm = 12 if head_dim <= 64 else (8 if mixed else 2)
    if compute_bound:  # q-blocks of prefill chunks keep the tensor cores busy with a couple of programs per SM;
        # flash-decoding split none of a B 4 x 2,048 SmolLM2 prefill's 1,548 programs, and cutting them was 1.26x slower
        programs_per_sm = 2
    # a PillarAttn draft row (budget 128-410 keys up to 8k contexts) stays one item in d64 steps: cut at 256 keys,
    # a B 64, L 8k SmolLM2 step merged its drafts and ran 1.11x slower (H200, bench/RESULTS.md)
    min_chunk = 512 if head_dim <= 64 else 256
    if interpreting():  # tests: few programs (interpreter time), short chunks so cut rows and merges still occur
        programs_per_sm, min_chunk = 2, 16
    return max(1, -(-programs_per_sm * _num_sms(device) // num_kv_heads)), min_chunk


def unified_attention_triton(q, k_cache, v_cache, *, query_start_loc, seq_lens, block_tables, max_query_len,
                             max_seq_len, scale, softcap=0.0, sliding_window=-1, is_sparse=None, draft_start=None,
                             pillar_indices=None, pillar_lengths=None, pillar_rows=None,
                             plan: AttentionPlan | None = None, chunk_keys: int | None = None, max_chunks: int = 64,
                             block_q: int | None = None, block_n: int | None = None, num_warps: int = 4,
                             num_stages: int = 2):
    """Launcher; arguments as :func:`sparsespec_compile.kernels.unified_attention` (validated there).

    ``plan`` is the step's work plan (:func:`attention_plan`; built here when None); its ``block_q`` sets the
    launch's. ``chunk_keys`` / ``max_chunks`` / ``block_q`` force the plan's cut, ``block_n`` (with ``num_warps`` /
    ``num_stages``) the tile config (tests, sweeps)."""
    T, Hq, D = q.shape
    _, P, Hkv, _ = k_cache.shape
    R = seq_lens.shape[0]
    if T == 0 or R == 0:
        return (torch.zeros(T, Hq, D, dtype=q.dtype, device=q.device),
                torch.full((T, Hq), float("-inf"), dtype=torch.float32, device=q.device))
    has_sparse = is_sparse is not None
    if has_sparse and pillar_rows is None:
        pillar_rows = torch.arange(R, device=q.device, dtype=torch.int32)
    if plan is None:
        plan = attention_plan(q, k_cache, query_start_loc=query_start_loc, seq_lens=seq_lens,
                              max_query_len=max_query_len, sliding_window=sliding_window, is_sparse=is_sparse,
                              draft_start=draft_start, pillar_lengths=pillar_lengths, pillar_rows=pillar_rows,
                              max_pillars=pillar_indices.shape[2] if has_sparse else 0, chunk_keys=chunk_keys,
                              max_chunks=max_chunks, block_q=block_q)
    bq, gp = plan.block_q, Hq // Hkv
    if bq < 1:
        raise ValueError(f"the plan's BLOCK_Q must be >= 1, got {bq}")
    bm = block_rows(gp, bq)
    W = plan.items.shape[0]
    counters = plan.counters if plan.counters is not None else torch.zeros(W, Hkv, dtype=torch.int32,
                                                                         device=q.device)
    if counters.shape != (W, Hkv):
        raise ValueError(f"the plan's merge counters are {tuple(counters.shape)}, this launch needs {(W, Hkv)}: build "
                         f"the plan with this cache's KV heads (attention_plan)")
    # Every real row is written by its item (one chunk) or by its unit's last item, padding rows by the programs past
    # the plan's items: no fill.
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, Hq, dtype=torch.float32, device=q.device)
    if not has_sparse:  # dummies, never read (HAS_SPARSE is a constexpr)
        is_sparse = draft_start = pillar_lengths = pillar_rows = seq_lens
        pillar_indices = block_tables[:, None, :]
    part_acc = torch.empty(W, Hkv, bm, D, dtype=torch.float32, device=q.device)
    part_m = torch.empty(W, Hkv, bm, dtype=torch.float32, device=q.device)
    part_l = torch.empty(W, Hkv, bm, dtype=torch.float32, device=q.device)
    upcast = interpreting()
    seq_bucket, work_bucket = triton.next_power_of_2(max(max_seq_len, 1)), triton.next_power_of_2(W)
    args = (out, lse, part_acc, part_m, part_l, plan.items, counters, q, k_cache, v_cache, query_start_loc, seq_lens,
            block_tables, is_sparse, draft_start, pillar_indices, pillar_lengths, pillar_rows,
            W, R, T, pillar_indices.shape[2], float(scale), float(softcap) if softcap > 0 else 1.0, int(sliding_window),
            seq_bucket, work_bucket, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            pillar_indices.stride(0), pillar_indices.stride(1))
    meta = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), GROUP=gp, BLOCK_Q=bq,
                BLOCK_M=bm, PAGE_SIZE=P, HAS_SPARSE=has_sparse, USE_SOFTCAP=softcap > 0,
                USE_WINDOW=sliding_window > 0, UPCAST=upcast,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    grid = (W + triton.cdiv(T, bq), Hkv)  # the plan's items, then the blocks of padding tokens
    if upcast or block_n is not None:
        _attn_kernel[grid](*args, BLOCK_N=block_n or 16, num_warps=num_warps, num_stages=num_stages, **meta)
    else:
        variant = (str(q.dtype), str(k_cache.dtype)) + tuple(sorted(meta.items()))
        launch_tuned("attention", _attn_kernel_tuned, variant, (seq_bucket, work_bucket), grid, args, meta)
    return out, lse


def attention_plan(q, k_cache, *, query_start_loc, seq_lens, max_query_len, sliding_window=-1, is_sparse=None,
                   draft_start=None, pillar_lengths=None, pillar_rows=None, max_pillars=0,
                   chunk_keys: int | None = None, max_chunks: int = 64, block_q: int | None = None) -> AttentionPlan:
    """The work plan of one launch over these queries (``q: [T, Hq, D]``) and this cache: ``BLOCK_Q`` from the
    shapes, the item target from the device. Build it once per step (and sliding window) and pass it to every
    layer's :func:`unified_attention`."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    bq = block_q or plan_blocks(Hq, Hkv, max_query_len)[0]
    target, min_chunk = work_target(q.device, D, Hkv, compute_bound=max_query_len > 16, mixed=is_sparse is not None)
    return plan_attention_triton(query_start_loc, seq_lens, T, bq, target_items=target, min_chunk=min_chunk,
                                 compute_bound=max_query_len > 16, num_kv_heads=Hkv,
                          max_chunks=max_chunks, sliding_window=sliding_window, is_sparse=is_sparse,
                          draft_start=draft_start, pillar_lengths=pillar_lengths, pillar_rows=pillar_rows,
                          max_pillars=max_pillars, chunk_keys=chunk_keys)
