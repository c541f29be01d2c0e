"""Streaming drafts (``draft="streaming"``): the fixed draft sets of MagicDec-like sinks + window, written on the device."""

from __future__ import annotations

import torch

from sparsespec_compile.context import PillarStore

from .host_copy import to_device


def write_streaming_pillars(pillars: PillarStore, slots: list[int], context_lens: list[int], budgets: list[int],
                            sinks: int = 4) -> None:
    """MagicDec-style fixed draft sets at the same budget, for every request of a step at once: row ``slots[i]``
    gets the ``sinks`` first tokens + the newest ``budget - sinks`` of its ``context_lens[i]`` (0 beyond its length).

    One small copy and three launches per step, built on the device: it was a Python list, a pinned copy and two
    writes per verifying request. Before that, a blocking ``torch.tensor(idx, device=cuda)`` per request. That took
    the H200 streaming step from 3.37 to 2.26 ms, but the run still idled 16 % (bench/RESULTS.md, fourth session).
    """
    if not slots:
        return
    b = [min(bud, n) for bud, n in zip(budgets, context_lens)]
    slot_t, ctx_t, b_t = to_device([slots, context_lens, b], pillars.indices.device)  # [3, R] int64
    j = torch.arange(max(b), device=slot_t.device)
    s_t = b_t.clamp(max=sinks)[:, None]
    idx = torch.where(j < s_t, j, ctx_t[:, None] - b_t[:, None] + j)
    idx = torch.where(j < b_t[:, None], idx, 0).to(torch.int32)  # [R, W]
    pillars.indices[:, slot_t, :, : idx.shape[1]] = idx[None, :, None, :]
    pillars.lengths[slot_t] = b_t.to(pillars.lengths.dtype)
