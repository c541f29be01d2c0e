"""The host side of the dynamic KV cache: a (pinned) host pool and the copy engine that runs a plan's swaps.

The scheduler decides (``StepPlan.swap_out`` / ``swap_in``, lists of ``SwapOp``); this file only moves bytes.

Layout: host page ``h`` holds one device page of every layer, K and V, contiguously:
``pages[h]: [2, num_layers, page_size, num_kv_heads, head_dim]``, so a run of consecutive host pages is one copy.
A swapped request's PillarStore row lives in ``pillar_indices[row]: [num_layers, num_kv_heads, max_budget]`` int32
and ``pillar_lengths[row]``.

Copies go in chunks of ``chunk_pages`` pages through a device staging buffer: gather the chunk's pages of every
layer on the device, then one non-blocking copy per run of consecutive host pages (restores run the other way).
On CUDA all of it runs on a side stream that first waits for the compute stream (earlier steps wrote those pages)
and that the compute stream waits for before the forward (the forward may write pages a swap-out just freed and
reads the pages a swap-in filled): no host synchronisation. The host pool is pinned (only when CUDA is available)
and never read by the CPU, so non-blocking copies into it are safe. On CPU the copies are plain and synchronous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sparsespec_compile.context import PagedKVCache, PillarStore

from .host_copy import to_device
from .kv_cache import free_memory_bytes, page_bytes
from .step_plan import SwapOp

HOST_MEMORY_FRACTION = 0.25  # default host pool: at most this share of available host memory


@dataclass
class OffloadStats:
    swaps_out: int = 0
    swaps_in: int = 0
    pages_out: int = 0
    pages_in: int = 0


def default_host_pages(kv: PagedKVCache) -> int:
    """As many host pages as device pages (2x oversubscription), capped at a quarter of available host memory."""
    per_page = page_bytes(len(kv.k), kv.k[0].shape[2], kv.k[0].shape[3], kv.page_size, kv.k[0].dtype)
    return max(1, min(kv.num_pages, int(free_memory_bytes("cpu") * HOST_MEMORY_FRACTION) // per_page))


def _runs(blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(offset, first, length)`` of each run of consecutive ids in ``blocks``: one copy per run."""
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(blocks):
        if out and out[-1][1] + out[-1][2] == b:
            off, first, n = out[-1]
            out[-1] = (off, first, n + 1)
        else:
            out.append((i, b, 1))
    return out


class HostKVPool:
    """``num_pages`` host pages and ``num_rows`` host pillar rows mirroring ``kv`` and ``pillars`` (None: no rows)."""

    def __init__(self, kv: PagedKVCache, pillars: PillarStore | None, num_pages: int, num_rows: int,
                 chunk_pages: int = 64) -> None:
        if num_pages < 1 or num_rows < 1 or chunk_pages < 1:
            raise ValueError(f"HostKVPool needs num_pages, num_rows and chunk_pages >= 1, got {num_pages}, "
                             f"{num_rows}, {chunk_pages}")
        self.kv, self.pillars = kv, pillars
        self.device = kv.k[0].device
        self.num_layers = len(kv.k)
        self.num_pages, self.chunk_pages = num_pages, min(chunk_pages, num_pages)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        page_shape = (2, self.num_layers, *kv.k[0].shape[1:])  # [2, L, page_size, H_kv, D]
        dtype = kv.k[0].dtype
        self.pages = torch.empty(num_pages, *page_shape, dtype=dtype, pin_memory=pin)
        self.stage = torch.empty(self.chunk_pages, *page_shape, dtype=dtype, device=self.device)
        self.pillar_indices = self.pillar_lengths = None
        if pillars is not None:
            _, _, heads, budget = pillars.indices.shape
            self.pillar_indices = torch.zeros(num_rows, self.num_layers, heads, budget, dtype=torch.int32,
                                              pin_memory=pin)
            self.pillar_lengths = torch.zeros(num_rows, dtype=torch.int32, pin_memory=pin)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stats = OffloadStats()

    def execute(self, swap_in: Sequence[SwapOp], swap_out: Sequence[SwapOp]) -> None:
        """Restores first, then offloads (``StepPlan``'s contract: a host page a restore frees may be reused by an
        offload of the same plan). Returns without waiting for the copies; the next forward is ordered after them."""
        if not (swap_in or swap_out):
            return
        if self.stream is None:
            self._copy_all(swap_in, swap_out)
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            self._copy_all(swap_in, swap_out)
        compute.wait_stream(self.stream)

    def _copy_all(self, swap_in: Sequence[SwapOp], swap_out: Sequence[SwapOp]) -> None:
        for op in swap_in:
            self._restore(op)
        for op in swap_out:
            self._offload(op)

    def _chunks(self, op: SwapOp):
        for i in range(0, len(op.device_blocks), self.chunk_pages):
            dev = op.device_blocks[i:i + self.chunk_pages]
            idx = to_device(dev, self.device)  # [m] int64, via pinned memory: never waits for the stream
            yield idx, op.host_blocks[i:i + self.chunk_pages]

    def _offload(self, op: SwapOp) -> None:
        for idx, host in self._chunks(op):
            m = len(host)
            for layer in range(self.num_layers):  # stage[:m, 0|1, layer]: [m, page_size, H_kv, D]
                self.stage[:m, 0, layer] = self.kv.k[layer].index_select(0, idx)
                self.stage[:m, 1, layer] = self.kv.v[layer].index_select(0, idx)
            for off, first, n in _runs(host):
                self.pages[first:first + n].copy_(self.stage[off:off + n], non_blocking=True)
        if self.pillars is not None:
            row = self.pillars.indices[:, op.pillar_slot].contiguous()  # [L, H_kv, B]
            self.pillar_indices[op.host_row].copy_(row, non_blocking=True)
            self.pillar_lengths[op.host_row:op.host_row + 1].copy_(
                self.pillars.lengths[op.pillar_slot:op.pillar_slot + 1], non_blocking=True)
        self.stats.swaps_out += 1
        self.stats.pages_out += len(op.device_blocks)

    def _restore(self, op: SwapOp) -> None:
        for idx, host in self._chunks(op):
            m = len(host)
            for off, first, n in _runs(host):
                self.stage[off:off + n].copy_(self.pages[first:first + n], non_blocking=True)
            for layer in range(self.num_layers):
                self.kv.k[layer].index_copy_(0, idx, self.stage[:m, 0, layer])
                self.kv.v[layer].index_copy_(0, idx, self.stage[:m, 1, layer])
        if self.pillars is not None:
            row = self.pillar_indices[op.host_row].to(self.device, non_blocking=True)
            self.pillars.indices[:, op.pillar_slot] = row
            self.pillars.lengths[op.pillar_slot:op.pillar_slot + 1].copy_(
                self.pillar_lengths[op.host_row:op.host_row + 1], non_blocking=True)
        self.stats.swaps_in += 1
        self.stats.pages_in += len(op.device_blocks)
