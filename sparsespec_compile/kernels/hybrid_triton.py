"""Triton kernel of :func:`draft_mass`: one program per (row, KV head), one read of the row's scores.

Kept apart from pillars_triton.py (scores and select) so that tuning those kernels never touches this one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import interpreting


@triton.jit(do_not_specialize=["N", "sinks"])
def _mass_kernel(out, scores, ctx_lens, budget, N, sinks, stride_sj, stride_sh, BLOCK: tl.constexpr):
    j = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.minimum(tl.load(ctx_lens + j).to(tl.int32), N)
    b = tl.maximum(tl.minimum(tl.load(budget + j).to(tl.int32), ctx), 0)
    s_n = tl.minimum(b, sinks)
    w_lo = ctx - (b - s_n)  # the window: the newest b - s_n positions
    row = scores + j.to(tl.int64) * stride_sj + h * stride_sh
    offs = tl.arange(0, BLOCK)
    m_sink = tl.zeros([BLOCK], tl.float32)
    m_win = tl.zeros([BLOCK], tl.float32)
    m_all = tl.zeros([BLOCK], tl.float32)
    for s0 in range(0, ctx, BLOCK):
        pos = s0 + offs
        ok = pos < ctx
        s = tl.load(row + pos, mask=ok, other=0.0).to(tl.float32)
        s = tl.where(ok & (s == s) & (s < float("inf")), s, 0.0)  # nan / inf (never expected) count as 0
        m_all += s
        m_sink += tl.where(pos < s_n, s, 0.0)
        m_win += tl.where((pos >= s_n) & (pos >= w_lo), s, 0.0)
    base = out + (j * tl.num_programs(1) + h) * 3
    tl.store(base, tl.sum(m_sink, 0))
    tl.store(base + 1, tl.sum(m_win, 0))
    tl.store(base + 2, tl.sum(m_all, 0))


def draft_mass_triton(scores, ctx_lens, budget, sinks):
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    Rv, H, N = scores.shape
    out = torch.zeros(Rv, H, 3, dtype=torch.float32, device=scores.device)
    if Rv == 0 or N == 0:
        return out
    blk = 64 if interpreting() else min(2048, max(256, triton.next_power_of_2(N)))
    _mass_kernel[(Rv, H)](out, scores, ctx_lens, budget, N, int(sinks), scores.stride(0), scores.stride(1),
                          BLOCK=blk, num_warps=1 if interpreting() else 4)
    return out
