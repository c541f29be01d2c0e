"""KV management for the scheduler (torch-free): device pages, pillar rows, and the host pool of the dynamic KV cache.

Who owns what: a running request holds device pages (``block_table``) and a PillarStore row (``pillar_slot``); a
SWAPPED request holds host pages (``host_blocks``) and a host pillar row (``host_row``) instead, and sits in
``swapped``. ``running + swapped <= max_num_seqs`` always (the scheduler admits nobody while a request is swapped),
so ``max_num_seqs`` rows of each kind never run out.

Eviction is an **offload** when the host pool has room: the request's written pages and its pillar row are listed
in ``plan.swap_out`` (the engine copies them to host memory before the forward), its device pages and pillar slot
are freed, and it waits in state SWAPPED with everything else intact — drafts of an interrupted cycle included.
Restores go first in a step, oldest admitted first (``plan.swap_in``: fresh pages, maybe a new pillar slot), as
soon as their pages plus the running requests' growth for the step fit. Only when the host pool is full does
eviction fall back to dropping the KV (the scheduler then re-queues the request for recompute; logged, counted in
``metrics.offload_fallbacks``).
"""

from __future__ import annotations

import logging
from collections import deque

from .block_allocator import BlockAllocator
from .request import Request, RequestState
from .step_plan import StepPlan, SwapOp

log = logging.getLogger("sparsespec.runtime")


class KVManager:
    def __init__(self, allocator: BlockAllocator, *, max_num_seqs: int, num_host_blocks: int = 0) -> None:
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0 (0 = no offload), got {num_host_blocks}")
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.host = BlockAllocator(num_host_blocks, allocator.page_size) if num_host_blocks else None
        self._free_slots = deque(range(max_num_seqs))
        self._free_host_rows = deque(range(max_num_seqs))
        self.swapped: list[Request] = []
        # the one place each is counted (per-request counts are in RequestMetrics)
        self.num_swap_outs = self.num_swap_ins = self.num_recomputes = 0

    # ---- queries ------------------------------------------------------------------------------------------------
    @property
    def has_free_slot(self) -> bool:
        return bool(self._free_slots)

    @property
    def num_free_host_rows(self) -> int:
        return len(self._free_host_rows)

    @staticmethod
    def kv_tokens(r: Request) -> int:
        """Positions whose KV a resumed ``r`` still reads: the verified context, plus the drafts of its cycle so far
        (a DRAFT step's dense tail). A VERIFY step rewrites its drafts' KV, a STALL request's old drafts are dead."""
        state = r.swapped_state if r.state is RequestState.SWAPPED else r.state
        return r.num_computed_tokens + (len(r.draft_token_ids) if state is RequestState.DRAFT else 0)

    def next_seq_len(self, r: Request) -> int:
        """Context length of ``r``'s next entry (pages it needs to run one more step)."""
        state = r.swapped_state if r.state is RequestState.SWAPPED else r.state
        return self.kv_tokens(r) + (len(r.draft_token_ids) + 1 if state is RequestState.VERIFY else 1)

    def worst_blocks(self, r: Request, max_model_len: int, stride: int) -> int:
        """Pages ``r`` may ever need: its whole context at ``max_tokens`` plus one verify chunk's overshoot."""
        return self.allocator.blocks_for(min(r.num_prompt_tokens + r.params.max_tokens, max_model_len) + stride)

    # ---- admission and release ----------------------------------------------------------------------------------
    def admit(self, r: Request) -> None:
        r.pillar_slot = self._free_slots.popleft()

    def grow(self, r: Request, num_tokens: int) -> bool:
        """Pages for positions ``0 .. num_tokens-1`` of ``r`` (all-or-nothing)."""
        return self.allocator.grow(r.block_table, num_tokens)

    def release(self, r: Request) -> None:
        """Free everything ``r`` holds, device or host (finished, aborted, or dropped for recompute)."""
        self.allocator.free(r.block_table)
        r.block_table = []
        if r.state is RequestState.SWAPPED:  # aborted while offloaded
            self.host.free(r.host_blocks)
            self._free_host_rows.append(r.host_row)
            r.host_blocks, r.host_row = [], -1
            self.swapped.remove(r)
        if r.pillar_slot >= 0:
            self._free_slots.append(r.pillar_slot)
            r.pillar_slot = -1

    # ---- eviction -----------------------------------------------------------------------------------------------
    def evict(self, r: Request, plan: StepPlan, step: int) -> bool:
        """Free ``r``'s device pages. True: offloaded (now SWAPPED, in ``swapped``); False: its KV is dropped (the
        caller re-queues it for recompute)."""
        n = self.allocator.blocks_for(self.kv_tokens(r))
        if self.host is not None and self.host.can_allocate(n) and self._free_host_rows:
            self._swap_out(r, n, plan)
            return True
        if self.host is not None:
            r.metrics.offload_fallbacks += 1
            log.warning("step %d: host KV pool full (%d of %d pages free, request %s needs %d): recompute preemption "
                        "of request %s instead of offload", step, self.host.num_free, self.host.num_blocks,
                        r.request_id, n, r.request_id)
        self.release(r)
        self.num_recomputes += 1
        r.metrics.num_preemptions += 1
        return False

    def _swap_out(self, r: Request, n: int, plan: StepPlan) -> None:
        host = self.host.allocate(n)
        row = self._free_host_rows.popleft()
        plan.swap_out.append(SwapOp(r, tuple(r.block_table[:n]), tuple(host), r.pillar_slot, row))
        self.allocator.free(r.block_table)
        self._free_slots.append(r.pillar_slot)
        r.block_table, r.pillar_slot, r.host_blocks, r.host_row = [], -1, host, row
        r.swapped_state, r.state = r.state, RequestState.SWAPPED  # a STALL keeps its stall_until
        r.metrics.num_offloads += 1
        self.num_swap_outs += 1
        self.swapped.append(r)

    def restore(self, plan: StepPlan, running: list[Request]) -> list[Request]:
        """Bring swapped requests back (returned, for the caller to put back in its running order), oldest admitted
        first and none overtaking another, while their pages plus every running decode request's growth this step fit
        in the free pages (always when nothing runs: ``Scheduler.check`` guarantees one request's worst case fits)."""
        if not self.swapped:  # the usual case: skip the growth sum over every running request (host time per step)
            return []
        growth = sum(max(0, self.allocator.blocks_for(self.next_seq_len(o)) - len(o.block_table))
                     for o in running if o.is_decoding)
        restored = []
        for r in sorted(self.swapped, key=lambda x: x.admit_order):
            need = self.allocator.blocks_for(self.next_seq_len(r))
            if (running or restored) and need + growth > self.allocator.num_free:
                break
            assert self._free_slots, "running + swapped exceeds max_num_seqs"
            blocks = self.allocator.allocate(len(r.host_blocks))
            slot = self._free_slots.popleft()
            plan.swap_in.append(SwapOp(r, tuple(blocks), tuple(r.host_blocks), slot, r.host_row))
            self.host.free(r.host_blocks)
            self._free_host_rows.append(r.host_row)
            self.swapped.remove(r)
            r.block_table, r.pillar_slot, r.host_blocks, r.host_row = blocks, slot, [], -1
            r.state, r.swapped_state = r.swapped_state, None
            self.num_swap_ins += 1
            growth += need - len(blocks)
            restored.append(r)
        return restored
