"""The unified scheduler (torch-free): one step mixes prefill chunks, draft tokens and verify tokens.

Each ``schedule()`` returns a ``StepPlan``; the engine runs it and hands the sampled tokens back through
``update(plan, sampled)``. See ``request.py`` for the per-request token/position bookkeeping.

Why phases: with stride ``k`` a request spends ``k`` steps drafting (1 token each) and one verifying (``k+1``
tokens), a cycle of ``C = k+1`` steps (``k+2`` with delayed verification). If every request verified on the same
step, step sizes would swing between ``n`` and ``n(k+1)`` tokens. So when a request enters its first cycle, its
draft count ``j`` (0..k; that cycle drafts with full attention anyway) is chosen to land its verify on the
least-loaded phase ``verify_step mod C``. With ``n`` decoding requests and no departures every step then carries
between ``n + k*floor(n/C)`` and ``n + k*ceil(n/C)`` tokens, i.e. about ``n(2k+1)/(k+1)`` (tested).

Order inside a step: decode requests first (oldest admitted first; they are latency-critical and phase-locked),
then running prefills, then newly admitted prompts, all within ``max_num_batched_tokens`` (chunked prefill).
Memory pressure (the dynamic KV cache): admission is aggressive — a prompt is admitted as soon as its prefill fits
in the free pages, with no reservation for its (unknown) output length; ``max_oversubscription`` optionally caps the
sum of worst-case page demands at that multiple of the pool. When a decode request needs a page and none is free,
the newest running request younger than it is evicted (it itself if none is younger: the oldest always progresses,
so no livelock). Eviction is an **offload** when the host pool has room: the request's written pages and its pillar
row are listed in ``plan.swap_out`` (the engine copies them to host memory before the forward), its device pages and
pillar slot are freed, and it waits in ``self.swapped`` in state SWAPPED with everything else intact — drafts of an
interrupted cycle included. Swapped requests are restored first, before any admission (none is admitted while one
is swapped), oldest first, into fresh pages (``plan.swap_in``; new block table, maybe a new pillar slot), as soon as
their pages plus the running requests' growth for the step fit; they continue exactly where they were. Only when
the host pool is full does eviction fall back to **recompute** preemption (logged; ``metrics.offload_fallbacks``):
the KV is dropped, drafts are discarded and the request re-prefills ``prompt + output[:-1]`` later; it is listed
in ``plan.preempted`` so the engine drops per-request device state (draft probs).
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import deque
from typing import Sequence

from .block_allocator import BlockAllocator
from .request import Request, RequestState
from .step_plan import StepEntry, StepKind, StepPlan, SwapOp  # noqa: F401  (re-exported)

log = logging.getLogger("sparsespec.runtime")
# States a request that was running leaves it for (evicted: preempted or offloaded; finished)
_NOT_RUNNING = (RequestState.WAITING, RequestState.SWAPPED, RequestState.FINISHED)  # a tuple: `in` is identity


class Scheduler:
    def __init__(self, allocator: BlockAllocator, *, stride: int = 8, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 4096,
                 eos_token_ids: Sequence[int] = (), delayed_verify: bool = False, num_host_blocks: int = 0,
                 max_oversubscription: float | None = None) -> None:
        if stride < 0:
            raise ValueError(f"stride must be >= 0 (0 = plain decoding), got {stride}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < stride + 1:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must hold one verify chunk "
                             f"(stride + 1 = {stride + 1})")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0 (0 = no offload), got {num_host_blocks}")
        if max_oversubscription is not None and max_oversubscription <= 0:
            raise ValueError(f"max_oversubscription must be > 0 or None, got {max_oversubscription}")
        self.allocator = allocator
        self.stride = stride
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        # Plain decoding (stride 0) verifies nothing: its token is final when sampled, so it never sits out a step
        # (it used to: every token then took two steps — measured on the H200, bench/RESULTS.md).
        self.delayed_verify = delayed_verify and stride > 0
        self.cycle_len = stride + 1 + (1 if self.delayed_verify else 0)
        self.step = 0  # index of the last plan handed out
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the tail is preempted first
        self._free_slots = deque(range(max_num_seqs))
        self._ids: set = set()
        self._finished: list[Request] = []  # not yet reported in a plan
        self._stall_step: dict[int, int] = {}  # request_id -> step it sits out
        self._held: set[int] = set()  # sitting out until release(): their step's results are still on the device
        # Offload: host pages (same page size) and host pillar rows. running + swapped <= max_num_seqs always (no
        # admission while a request is swapped), so max_num_seqs rows never run out.
        self.host = BlockAllocator(num_host_blocks, allocator.page_size) if num_host_blocks else None
        self._free_host_rows = deque(range(max_num_seqs))
        self.swapped: list[Request] = []
        self.max_oversubscription = max_oversubscription
        self._admissions = itertools.count()
        self.num_swap_outs = self.num_swap_ins = self.num_recomputes = 0

    # ---- admission ----------------------------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """Raise ``ValueError`` if ``req`` can never be served by this scheduler."""
        if req.request_id in self._ids:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"prompt has {req.num_prompt_tokens} tokens but max_model_len is {self.max_model_len}: "
                             f"no room left for a generated token")
        worst = min(req.num_prompt_tokens + req.params.max_tokens, self.max_model_len) + self.stride
        if self.allocator.blocks_for(worst) > self.allocator.num_blocks:
            raise ValueError(f"request may need {self.allocator.blocks_for(worst)} KV pages (prompt "
                             f"{req.num_prompt_tokens} + max_tokens {req.params.max_tokens}) but the pool has "
                             f"{self.allocator.num_blocks}: lower max_tokens or give the KV cache more memory")

    def add(self, req: Request) -> bool:
        """Queue ``req``; if it can never be served it is finished at once with ``finish_reason='error: ...'``
        (reported in the next plan) and ``False`` is returned. Other requests are never affected."""
        try:
            self.check(req)
        except ValueError as e:
            self._ids.add(req.request_id)
            self._finish(req, f"error: {e}")
            return False
        self._ids.add(req.request_id)
        req.metrics.arrival_step = self.step
        self.waiting.append(req)
        return True

    def abort(self, req: Request, reason: str = "abort") -> None:
        """Finish ``req`` now (e.g. ``'error: ...'`` when its step failed); its blocks are freed."""
        if req.is_finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, reason)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self._finished)

    # ---- schedule -----------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self.step += 1
        plan = StepPlan(self.step, finished=self._finished)
        self._finished = []
        self._restore(plan)
        while True:
            budget = self._schedule_running(plan)
            self._admit(plan, budget)
            if plan.entries or not self.running or any(r.state is RequestState.STALL for r in self.running):
                return plan  # (an empty plan is legal: everyone left is sitting out a delayed verification)
            # Nothing could run although requests hold pages (prefills starved of pages): free the newest and retry.
            self._evict(self.running[-1], plan)

    def _schedule_running(self, plan: StepPlan) -> int:
        budget = self.max_num_batched_tokens
        for r in [r for r in self.running if r.is_decoding]:
            if r.state in _NOT_RUNNING:
                continue  # evicted earlier in this loop (state, not `in self.running`: that is O(batch) per request)
            if r.state is RequestState.STALL:
                if r.request_id in self._held or self._stall_step[r.request_id] >= self.step:
                    continue
                del self._stall_step[r.request_id]
                self._begin_cycle(r)
            e = self._decode_entry(r)
            if e.num_tokens > budget:
                continue  # waits a step; its phase shifts by one
            while not self.allocator.grow(r.block_table, e.seq_len):
                # Only younger requests are victims (the oldest always progresses: no livelock); they are
                # unscheduled so far because decode goes in admission order and prefills come after.
                younger = self.running[self.running.index(r) + 1:]
                self._evict(younger[-1] if younger else r, plan)
                if not younger:
                    break
            if r.state in _NOT_RUNNING:
                continue
            plan.entries.append(e)
            budget -= e.num_tokens
        for r in [r for r in self.running if r.state is RequestState.PREFILL]:
            budget -= self._prefill_chunk(r, plan, budget)
        return budget

    def _decode_entry(self, r: Request) -> StepEntry:
        n = r.num_computed_tokens
        inputs = [r.last_token_id] + r.draft_token_ids
        if r.state is RequestState.DRAFT:
            i = len(r.draft_token_ids)
            return StepEntry(r, StepKind.DRAFT, (inputs[i],), n + i, 1, sparse=r.has_pillars,
                             draft_start=r.draft_start)
        return StepEntry(r, StepKind.VERIFY, tuple(inputs), n, len(inputs), score=self.stride > 0,
                         draft_start=r.draft_start)

    def _prefill_chunk(self, r: Request, plan: StepPlan, budget: int) -> int:
        n, target = r.num_computed_tokens, r.prefill_target
        # Only as many tokens as free pages (plus the slack of the last page) can hold.
        room = (len(r.block_table) + self.allocator.num_free) * self.allocator.page_size - n
        chunk = min(target - n, budget, room)
        if chunk <= 0:
            return 0
        assert self.allocator.grow(r.block_table, n + chunk)
        last = n + chunk == target and not r.output_token_ids
        plan.entries.append(StepEntry(r, StepKind.PREFILL, tuple(r.all_token_ids[n:n + chunk]), n, int(last)))
        return chunk

    def _admit(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and self._free_slots and not self.swapped:  # swapped ones come first
            r = self.waiting[0]
            if r in plan.preempted:
                return  # not back in the step that evicted it: that would only thrash
            # Watermark: admit only if its whole prefill fits in free pages now, so admitted prompts finish
            # prefilling instead of all stalling half-way; and only if the decode load stays within the budget.
            if not self.allocator.can_allocate(self.allocator.blocks_for(r.prefill_target + 1)):
                return
            if self._decode_load(len(self.running) + 1) > self.max_num_batched_tokens:
                return
            if self.max_oversubscription is not None and sum(self._worst_blocks(o) for o in [*self.running, r]) > \
                    self.max_oversubscription * self.allocator.num_blocks:
                return
            self.waiting.popleft()
            r.state = RequestState.PREFILL
            r.admit_order = next(self._admissions)
            r.pillar_slot = self._free_slots.popleft()
            self.running.append(r)
            budget -= self._prefill_chunk(r, plan, budget)

    def _decode_load(self, n: int) -> int:
        """Tokens per step of ``n`` phase-balanced decoding requests (worst step)."""
        return n + self.stride * -(-n // self.cycle_len)

    # ---- update -------------------------------------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: Sequence[Sequence[int]]) -> None:
        """Apply the step's results. ``sampled[i]`` belongs to ``plan.entries[i]``:
        PREFILL ``[]`` or ``[t0]`` (when ``num_logits == 1``), DRAFT ``[d]``, VERIFY the ``a`` accepted drafts then
        the target's token (``a + 1`` ids, ``0 <= a <= j``; trailing ``-1`` padding, as ``verify.py`` returns it, is
        dropped). A malformed result finishes that request with ``'error: ...'``; the others are unaffected."""
        if len(sampled) != len(plan.entries):
            raise ValueError(f"update got {len(sampled)} results for {len(plan.entries)} entries")
        entering: list[Request] = []
        for e, toks in zip(plan.entries, sampled):
            r = e.request
            if r.is_finished or r.state in (RequestState.WAITING, RequestState.SWAPPED):
                continue  # aborted between schedule and update
            toks = [int(t) for t in toks]
            while e.kind is StepKind.VERIFY and toks and toks[-1] < 0:
                toks.pop()
            bad = self._check_result(e, toks)
            if bad:
                self._finish(r, f"error: {bad}")
                continue
            if e.kind is StepKind.PREFILL:
                r.num_computed_tokens += e.num_tokens
                if r.num_computed_tokens == r.prefill_target:
                    r.draft_start = r.num_computed_tokens
                    if e.num_logits:
                        r.metrics.first_token_step = plan.step
                        if self._append(r, toks[:1]):
                            continue
                    entering.append(r)
            elif e.kind is StepKind.DRAFT:
                r.draft_token_ids.append(toks[0])
                if len(r.draft_token_ids) == r.num_cycle_drafts:
                    r.state = RequestState.VERIFY
            else:
                j, a = e.num_tokens - 1, len(toks) - 1
                r.metrics.accepted.append(a)
                r.metrics.drafted.append(j)
                r.draft_start = e.start_pos  # next cycle: pillars before the chunk, dense from it on
                r.has_pillars = e.score
                r.num_computed_tokens = e.start_pos + a + 1  # KV of [last, d1..da] is now verified
                if self._append(r, toks):
                    continue
                if self.delayed_verify:
                    r.state = RequestState.STALL
                    self._stall_step[r.request_id] = plan.step + 1
                else:
                    self._begin_cycle(r)
        for r in entering:  # after every other request's state is final, so phase loads are exact
            self._begin_cycle(r, first=True)

    def launch_decode(self, e: StepEntry, token: int) -> None:
        """Overlap at stride 0: apply plain decode ``e`` (just launched) before its token is known. ``token`` is a
        placeholder (overlap.py) that becomes the request's last output token, so the next step runs on it (patched
        on the device). The stop checks wait for the value (``confirm_decode``): a request that turns out to have
        stopped has had at most one more step computed, whose token is dropped. At its length limit the request
        sits out (held) until the value arrives."""
        r = e.request
        r.metrics.accepted.append(0)
        r.metrics.drafted.append(0)
        r.draft_start = e.start_pos
        r.num_computed_tokens = e.start_pos + 1
        r.output_token_ids.append(token)
        r.num_pending += 1
        if len(r.output_token_ids) >= r.params.max_tokens or r.num_tokens >= self.max_model_len:
            self.hold(r)
        else:
            self._begin_cycle(r)

    def confirm_decode(self, r: Request, idx: int, token: int, value: int) -> bool:
        """The value of a ``launch_decode`` placeholder arrived: put it in place and apply the stop checks that
        waited for it. False if the token is dropped (the request had already finished, or stopped before it)."""
        if r.is_finished or idx >= len(r.output_token_ids) or r.output_token_ids[idx] != token:
            return False
        r.output_token_ids[idx] = value
        r.num_pending -= 1
        p = r.params
        if value in p.stop_token_ids or (value in self.eos_token_ids and not p.ignore_eos):
            del r.output_token_ids[idx + 1:]  # computed after the stop, never emitted
            r.num_pending = 0
            self._finish_any(r, "stop")
        elif r.num_pending == 0 and (len(r.output_token_ids) >= p.max_tokens or r.num_tokens >= self.max_model_len):
            self._finish_any(r, "length")
        return True

    def _finish_any(self, r: Request, reason: str) -> None:
        """Finish ``r`` from any state (running, held, waiting after a preemption, offloaded)."""
        self._held.discard(r.request_id)
        self._stall_step.pop(r.request_id, None)
        if r in self.waiting:
            self.waiting.remove(r)
        self._finish(r, reason)

    def hold(self, r: Request) -> None:
        """Overlap: ``r`` (a verify, or a prefill that ends its prompt) ran in the step just launched and its result
        is still on the device: it sits out every step until ``release`` — at least the next one, which is the
        delayed verification schedule. Its ``update`` comes with the release."""
        r.state = RequestState.STALL
        self._stall_step[r.request_id] = self.step + 1
        self._held.add(r.request_id)

    def release(self, r: Request) -> None:
        self._held.discard(r.request_id)

    @staticmethod
    def _check_result(e: StepEntry, toks: list[int]) -> str | None:
        """Why ``toks`` cannot be the result of entry ``e`` (an engine bug, confined to that request), or None.
        A DRAFT result may be a negative placeholder (overlap: the token is still on the device)."""
        if e.kind is StepKind.DRAFT and len(toks) == 1:
            return None
        if any(t < 0 for t in toks):
            return f"negative token id in step result {toks}"
        if e.kind is StepKind.VERIFY:
            if not 1 <= len(toks) <= e.num_tokens or toks[:-1] != list(e.draft_token_ids[:len(toks) - 1]):
                return f"verify result {toks} inconsistent with drafts {list(e.draft_token_ids)}"
        elif len(toks) < e.num_logits:
            return f"{e.kind.value} step expected {e.num_logits} sampled token(s), got {toks}"
        return None

    def _append(self, r: Request, toks: list[int]) -> bool:
        """Append sampled tokens, stopping at EOS / stop ids / limits; True if ``r`` finished."""
        p = r.params
        for t in toks:
            r.output_token_ids.append(t)
            if t in p.stop_token_ids or (t in self.eos_token_ids and not p.ignore_eos):
                self._finish(r, "stop")
                return True
            if len(r.output_token_ids) >= p.max_tokens or r.num_tokens >= self.max_model_len:
                self._finish(r, "length")
                return True
        return False

    def _begin_cycle(self, r: Request, first: bool = False) -> None:
        remaining = min(r.params.max_tokens - len(r.output_token_ids), self.max_model_len - r.num_tokens)
        j_max = min(self.stride, remaining - 1)  # a verify emits up to j+1 tokens; don't draft past the limit
        j = j_max
        if first and j_max > 0:
            load = [0] * self.cycle_len
            for o in self.running:
                if o is not r and o.is_decoding:
                    load[self._next_verify_step(o) % self.cycle_len] += 1
            nxt = self.step + 1
            # With delayed verification a cycle is k+2 steps but drafts reach only k+1 verify phases; the last one
            # is reached by sitting out one step first (without it, steps drifted k tokens past the bound: tested).
            c_max = j_max + 1 if self.delayed_verify and j_max == self.stride else j_max
            j = min(range(c_max + 1), key=lambda c: (load[(nxt + c) % self.cycle_len], c > j_max, -c))
            if j > j_max:
                r.state = RequestState.STALL
                self._stall_step[r.request_id] = nxt
                return
        r.num_cycle_drafts = j
        r.draft_token_ids = []
        r.state = RequestState.DRAFT if j > 0 else RequestState.VERIFY

    def _next_verify_step(self, r: Request) -> int:
        if r.state is RequestState.STALL:
            return self._stall_step[r.request_id] + 1 + self.stride
        return self.step + 1 + r.num_cycle_drafts - len(r.draft_token_ids)

    # ---- release ------------------------------------------------------------------------------------------------
    def _release(self, r: Request) -> None:
        self.allocator.free(r.block_table)
        r.block_table = []
        if r in self.swapped:  # aborted while offloaded
            self.host.free(r.host_blocks)
            self._free_host_rows.append(r.host_row)
            r.host_blocks, r.host_row = [], -1
            self.swapped.remove(r)
        if r.pillar_slot >= 0:
            self._free_slots.append(r.pillar_slot)
            r.pillar_slot = -1
        if r in self.running:
            self.running.remove(r)
        self._stall_step.pop(r.request_id, None)

    def _finish(self, r: Request, reason: str) -> None:
        self._release(r)
        r.state = RequestState.FINISHED
        r.finish_reason = reason
        r.metrics.finish_step = self.step
        self._finished.append(r)

    def _preempt(self, r: Request, plan: StepPlan) -> None:
        """Recompute preemption: drop ``r``'s KV; it re-prefills ``prompt + output[:-1]`` when pages free up."""
        self.num_recomputes += 1
        self._release(r)
        r.state = RequestState.WAITING
        r.num_computed_tokens = 0
        r.draft_token_ids = []
        r.num_cycle_drafts = 0
        r.has_pillars = False
        r.metrics.num_preemptions += 1
        self.waiting.appendleft(r)
        plan.preempted.append(r)

    # ---- offload ------------------------------------------------------------------------------------------------
    def _evict(self, r: Request, plan: StepPlan) -> None:
        """Free ``r``'s device pages: offload it when the host pool has room, else recompute preemption."""
        n = self.allocator.blocks_for(self._kv_tokens(r))
        if self.host is not None and self.host.can_allocate(n) and self._free_host_rows:
            self._swap_out(r, n, plan)
            return
        if self.host is not None:
            r.metrics.offload_fallbacks += 1
            log.warning("step %d: host KV pool full (%d of %d pages free, request %s needs %d): recompute preemption "
                        "of request %s instead of offload", self.step, self.host.num_free, self.host.num_blocks,
                        r.request_id, n, r.request_id)
        self._preempt(r, plan)

    @staticmethod
    def _kv_tokens(r: Request) -> int:
        """Positions whose KV a resumed ``r`` still reads: the verified context, plus the drafts of its cycle so far
        (a DRAFT step's dense tail). A VERIFY step rewrites its drafts' KV, a STALL request's old drafts are dead."""
        state = r.swapped_state if r.state is RequestState.SWAPPED else r.state
        return r.num_computed_tokens + (len(r.draft_token_ids) if state is RequestState.DRAFT else 0)

    def _next_seq_len(self, r: Request) -> int:
        """Context length of ``r``'s next entry (pages it needs to run one more step)."""
        state = r.swapped_state if r.state is RequestState.SWAPPED else r.state
        return self._kv_tokens(r) + (len(r.draft_token_ids) + 1 if state is RequestState.VERIFY else 1)

    def _worst_blocks(self, r: Request) -> int:
        return self.allocator.blocks_for(
            min(r.num_prompt_tokens + r.params.max_tokens, self.max_model_len) + self.stride)

    def _swap_out(self, r: Request, n: int, plan: StepPlan) -> None:
        host = self.host.allocate(n)
        row = self._free_host_rows.popleft()
        plan.swap_out.append(SwapOp(r, tuple(r.block_table[:n]), tuple(host), r.pillar_slot, row))
        self.allocator.free(r.block_table)
        self._free_slots.append(r.pillar_slot)
        self.running.remove(r)
        r.block_table, r.pillar_slot, r.host_blocks, r.host_row = [], -1, host, row
        r.swapped_state, r.state = r.state, RequestState.SWAPPED  # a STALL keeps its _stall_step entry
        r.metrics.num_offloads += 1
        self.num_swap_outs += 1
        self.swapped.append(r)

    def _restore(self, plan: StepPlan) -> None:
        """Bring swapped requests back, oldest admitted first and none overtaking another, while their pages plus
        every running decode request's growth this step fit in the free pages (always when nothing runs:
        ``check`` guarantees one request's worst case fits the pool)."""
        if not self.swapped:  # the usual case: skip the growth sum over every running request (host time per step)
            return
        growth = sum(max(0, self.allocator.blocks_for(self._next_seq_len(o)) - len(o.block_table))
                     for o in self.running if o.is_decoding)
        for r in sorted(self.swapped, key=lambda x: x.admit_order):
            need = self.allocator.blocks_for(self._next_seq_len(r))
            if self.running and need + growth > self.allocator.num_free:
                return
            assert self._free_slots, "running + swapped exceeds max_num_seqs"
            blocks = self.allocator.allocate(len(r.host_blocks))
            slot = self._free_slots.popleft()
            plan.swap_in.append(SwapOp(r, tuple(blocks), tuple(r.host_blocks), slot, r.host_row))
            self.host.free(r.host_blocks)
            self._free_host_rows.append(r.host_row)
            self.swapped.remove(r)
            r.block_table, r.pillar_slot, r.host_blocks, r.host_row = blocks, slot, [], -1
            r.state, r.swapped_state = r.swapped_state, None
            bisect.insort(self.running, r, key=lambda x: x.admit_order)  # back in its place: victims stay the newest
            self.num_swap_ins += 1
            growth += need - len(blocks)
