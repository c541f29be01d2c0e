"""The unified scheduler (torch-free): step assembly. One step mixes prefill chunks, draft tokens and verify tokens.

Each ``schedule()`` returns a ``StepPlan``; the engine runs it and hands the sampled tokens back through
``update(plan, sampled)``. Three pieces, one file each:

* this file — *what runs in a step*: admission, chunked prefill, one entry per decoding request, and the results
  (``update``; the stop check, ``_stops`` and ``_stop_reason``). Each entry's mode — sparse or full attention, and
  the pillar refresh of a verify (none / score / streaming) — is decided here, in ``_decode_entry``, and nowhere
  else;
* cycle_planner.py — *where a row's draft-or-verify path is chosen*: each request's ``j`` per cycle (a fixed stride
  or the adaptive per-request choice of stride_policy.py) and its phase; acceptance is counted there
  (``record_verify``);
* kv_manager.py — pages, pillar rows, offload to the host pool and restore.

Order inside a step: restores first, then decode requests (oldest admitted first; they are latency-critical and
phase-locked), then running prefills, then newly admitted prompts, all within ``max_num_batched_tokens``.
Memory pressure (the dynamic KV cache): admission is aggressive — a prompt is admitted as soon as its prefill fits
in the free pages, with no reservation for its (unknown) output length; ``max_oversubscription`` optionally caps the
sum of worst-case page demands at that multiple of the pool. When a decode request needs a page and none is free,
the newest running request younger than it is evicted (it itself if none is younger: the oldest always progresses,
so no livelock): offloaded when the host pool has room, else re-queued to re-prefill ``prompt + output[:-1]``
(listed in ``plan.preempted`` so the engine drops per-request device state, e.g. draft probabilities).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from typing import Sequence

from .block_allocator import BlockAllocator
from .cycle_planner import CyclePlanner
from .kv_manager import KVManager
from .request import Request, RequestState
from .step_plan import Refresh, StepEntry, StepKind, StepPlan, SwapOp  # noqa: F401  (re-exported)
from .stride_policy import FixedStride, StridePolicy

# States a request that was running leaves it for (evicted: preempted or offloaded; finished)
_NOT_RUNNING = (RequestState.WAITING, RequestState.SWAPPED, RequestState.FINISHED)  # a tuple: `in` is identity
_SKIPPED = (*_NOT_RUNNING, RequestState.STALL)  # not scheduled this step
_DECODING = (RequestState.DRAFT, RequestState.VERIFY, RequestState.STALL)  # Request.is_decoding, without the call
_GONE = (RequestState.FINISHED, RequestState.WAITING, RequestState.SWAPPED)  # aborted between schedule and update
_DRAFTS = ("pillar", "streaming", "hybrid", "full")
# Enum members as module globals: ``RequestState.DRAFT`` (a read off the enum class) costs ~0.18 us more than a global
# on Python 3.11, and the per-request checks below run thousands of times a step
_ST_WAITING, _ST_PREFILL, _ST_DRAFT, _ST_VERIFY, _ST_STALL, _ST_SWAPPED, _ST_FINISHED = (
    RequestState.WAITING, RequestState.PREFILL, RequestState.DRAFT, RequestState.VERIFY, RequestState.STALL,
    RequestState.SWAPPED, RequestState.FINISHED)
_PREFILL, _DRAFT, _VERIFY, _NO_REFRESH = StepKind.PREFILL, StepKind.DRAFT, StepKind.VERIFY, Refresh.NONE


class Scheduler:
    def __init__(self, allocator: BlockAllocator, *, stride: int = 8, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 4096,
                 eos_token_ids: Sequence[int] = (), delayed_verify: bool = False, num_host_blocks: int = 0,
                 max_oversubscription: float | None = None, draft: str = "pillar",
                 policy: StridePolicy | None = None) -> None:
        if stride < 0:
            raise ValueError(f"stride must be >= 0 (0 = plain decoding), got {stride}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < stride + 1:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must hold one verify chunk "
                             f"(stride + 1 = {stride + 1})")
        if max_oversubscription is not None and max_oversubscription <= 0:
            raise ValueError(f"max_oversubscription must be > 0 or None, got {max_oversubscription}")
        if draft not in _DRAFTS:
            raise ValueError(f"draft must be one of {_DRAFTS}, got {draft!r}")
        policy = policy if policy is not None else FixedStride(stride)
        if policy.stride != stride:
            raise ValueError(f"the stride policy's stride ({policy.stride}) differs from stride={stride}")
        self.stride = stride
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.draft = draft
        # an entry's mode depends on the config only through these two (decided once, read per request per step)
        self._sparse_drafts = draft != "full"
        self._refresh = _NO_REFRESH if draft == "full" else Refresh.STREAMING if draft == "streaming" else Refresh.SCORE
        self.kv = KVManager(allocator, max_num_seqs=max_num_seqs, num_host_blocks=num_host_blocks)
        self.allocator = allocator
        self.planner = CyclePlanner(policy, delayed_verify=delayed_verify, max_model_len=max_model_len)
        self.step = 0  # index of the last plan handed out
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the tail is evicted first
        self._ids: set = set()
        self._finished: list[Request] = []  # not yet reported in a plan
        self.max_oversubscription = max_oversubscription
        self._admissions = itertools.count()

    # views kept for callers that read them (engine, tests, benchmarks)
    delayed_verify = property(lambda self: self.planner.delayed_verify)
    cycle_len = property(lambda self: self.planner.cycle_len)
    host = property(lambda self: self.kv.host)
    swapped = property(lambda self: self.kv.swapped)
    num_swap_outs = property(lambda self: self.kv.num_swap_outs)
    num_swap_ins = property(lambda self: self.kv.num_swap_ins)
    num_recomputes = property(lambda self: self.kv.num_recomputes)

    # ---- admission ----------------------------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """Raise ``ValueError`` if ``req`` can never be served by this scheduler."""
        if req.request_id in self._ids:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if req.num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"prompt has {req.num_prompt_tokens} tokens but max_model_len is {self.max_model_len}: "
                             f"no room left for a generated token")
        worst = self.kv.worst_blocks(req, self.max_model_len, self.stride)
        if worst > self.allocator.num_blocks:
            raise ValueError(f"request may need {worst} KV pages (prompt "
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
        """Finish ``req`` now, from any state (e.g. ``'error: ...'`` when its step failed); its pages are freed."""
        if not req.is_finished:
            self._finish(req, reason)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.kv.swapped or self._finished)

    # ---- schedule -----------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self.step += 1
        plan = StepPlan(self.step, finished=self._finished)
        self._finished = []
        for r in self.kv.restore(plan, self.running):
            bisect.insort(self.running, r, key=lambda x: x.admit_order)  # back in its place: victims stay the newest
        while True:
            budget = self._schedule_running(plan)
            self._admit(plan, budget)
            if plan.entries or not self.running or any(r.state is _ST_STALL for r in self.running):
                # complete: its entries are fixed and its aggregates computed (an empty plan is legal: everyone
                # left is sitting out a delayed verification)
                return plan.seal()
            # Nothing could run although requests hold pages (prefills starved of pages): free the newest and retry.
            self._evict(self.running[-1], plan)

    def _schedule_running(self, plan: StepPlan) -> int:
        budget = self.max_num_batched_tokens
        step = self.step
        decoding = [r for r in self.running if r.state in _DECODING]
        due = [r for r in decoding if r.state is _ST_STALL and not r.held and r.stall_until < step]
        for r in due:  # sat out its step(s): its next cycle starts with this step
            r.stall_until = -1
        self.planner.begin_cycles(due, step - 1, self.running)
        page_size, entries = self.allocator.page_size, plan.entries
        for r in decoding:
            if r.state in _SKIPPED:
                continue  # evicted earlier in this loop (state, not `in self.running`: that is O(batch) per request)
            e = self._decode_entry(r)
            if e.num_tokens > budget:
                continue  # waits a step; its phase shifts by one
            # the usual case, the pages already cover the entry: no call into the KV manager
            if -(-e.seq_len // page_size) > len(r.block_table):
                while not self.kv.grow(r, e.seq_len):
                    # Only younger requests are victims (the oldest always progresses: no livelock); they are
                    # unscheduled so far because decode goes in admission order and prefills come after.
                    younger = self.running[self.running.index(r) + 1:]
                    self._evict(younger[-1] if younger else r, plan)
                    if not younger:
                        break
                if r.state in _NOT_RUNNING:
                    continue
            entries.append(e)
            budget -= e.num_tokens
        for r in [r for r in self.running if r.state is _ST_PREFILL]:
            budget -= self._prefill_chunk(r, plan, budget)
        return budget

    def _decode_entry(self, r: Request) -> StepEntry:
        """``r``'s row of this step, with its whole mode: sparse or full attention, and the verify's pillar refresh."""
        n = r.num_computed_tokens
        drafts = r.draft_token_ids
        last = r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1]  # r.last_token_id
        if r.state is _ST_DRAFT:
            i = len(drafts)
            return StepEntry(r, _DRAFT, (drafts[i - 1] if i else last,), n + i, 1,
                             r.has_pillars and self._sparse_drafts, _NO_REFRESH, r.draft_start)
        refresh = self._refresh if r.cycle_refresh else _NO_REFRESH
        return StepEntry(r, _VERIFY, (last, *drafts), n, len(drafts) + 1, False, refresh, r.draft_start)

    def _prefill_chunk(self, r: Request, plan: StepPlan, budget: int) -> int:
        n, target = r.num_computed_tokens, r.prefill_target
        # Only as many tokens as free pages (plus the slack of the last page) can hold.
        room = (len(r.block_table) + self.allocator.num_free) * self.allocator.page_size - n
        chunk = min(target - n, budget, room)
        if chunk <= 0:
            return 0
        assert self.kv.grow(r, n + chunk)
        last = n + chunk == target and not r.output_token_ids
        plan.entries.append(StepEntry(r, _PREFILL, tuple(r.all_token_ids[n:n + chunk]), n, int(last)))
        return chunk

    def _admit(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and self.kv.has_free_slot and not self.kv.swapped:  # swapped come first
            r = self.waiting[0]
            if r in plan.preempted:
                return  # not back in the step that evicted it: that would only thrash
            # Watermark: admit only if its whole prefill fits in free pages now, so admitted prompts finish
            # prefilling instead of all stalling half-way; and only if the decode load stays within the budget.
            if not self.allocator.can_allocate(self.allocator.blocks_for(r.prefill_target + 1)):
                return
            if self.planner.decode_load(len(self.running) + 1) > self.max_num_batched_tokens:
                return
            if self.max_oversubscription is not None and sum(
                    self.kv.worst_blocks(o, self.max_model_len, self.stride) for o in [*self.running, r]) > \
                    self.max_oversubscription * self.allocator.num_blocks:
                return
            self.waiting.popleft()
            r.state = _ST_PREFILL
            r.admit_order = next(self._admissions)
            self.kv.admit(r)
            self.running.append(r)
            budget -= self._prefill_chunk(r, plan, budget)

    def _evict(self, r: Request, plan: StepPlan) -> None:
        """Free ``r``'s device pages: offload it when the host pool has room, else drop its KV and re-queue it."""
        self.running.remove(r)
        if self.kv.evict(r, plan, self.step):
            return
        r.state = _ST_WAITING
        r.num_computed_tokens = 0
        r.draft_token_ids = []
        r.num_cycle_drafts = 0
        r.has_pillars = False
        r.stall_until, r.held = -1, False
        self.waiting.appendleft(r)
        plan.preempted.append(r)

    # ---- update -------------------------------------------------------------------------------------------------
    def update(self, plan: StepPlan, sampled: Sequence[Sequence[int]]) -> None:
        """Apply the step's results. ``sampled[i]`` belongs to ``plan.entries[i]``:
        PREFILL ``[]`` or ``[t0]`` (when ``num_logits == 1``), DRAFT ``[d]``, VERIFY the ``a`` accepted drafts then
        the target's token (``a + 1`` ids, ``0 <= a <= j``; trailing ``-1`` padding, as ``verify.py`` returns it, is
        dropped). A malformed result finishes that request with ``'error: ...'``; the others are unaffected."""
        if len(sampled) != len(plan.entries):
            raise ValueError(f"update got {len(sampled)} results for {len(plan.entries)} entries")
        entering: list[Request] = []  # prompts just prefilled: their first cycle
        starting: list[Request] = []  # verified: their next cycle
        planner = self.planner
        for e, toks in zip(plan.entries, sampled):
            r = e.request
            if r.state in _GONE:
                continue  # aborted between schedule and update
            kind = e.kind
            if kind is _DRAFT and len(toks) == 1:  # the common case first: one draft (maybe a placeholder)
                drafts = r.draft_token_ids
                drafts.append(int(toks[0]))
                if len(drafts) == r.num_cycle_drafts:
                    r.state = _ST_VERIFY
                continue
            toks = [int(t) for t in toks]
            if kind is _VERIFY:
                while toks and toks[-1] < 0:
                    toks.pop()
            bad = self._check_result(e, toks)
            if bad:
                self._finish(r, f"error: {bad}")
                continue
            if kind is _PREFILL:
                r.num_computed_tokens += e.num_tokens
                if r.num_computed_tokens == r.prefill_target:
                    r.draft_start = r.num_computed_tokens
                    if e.num_logits:
                        r.metrics.first_token_step = plan.step
                        if self._append(r, toks[:1]):
                            continue
                    entering.append(r)
            elif kind is _DRAFT:
                r.draft_token_ids.append(toks[0])
                if len(r.draft_token_ids) == r.num_cycle_drafts:
                    r.state = _ST_VERIFY
            else:
                j, a = e.num_tokens - 1, len(toks) - 1
                planner.record_verify(r, j, a)
                r.draft_start = e.start_pos  # next cycle: pillars before the chunk, dense from it on
                r.has_pillars = e.refresh is not _NO_REFRESH
                r.num_computed_tokens = e.start_pos + a + 1  # KV of [last, d1..da] is now verified
                if self._append(r, toks):
                    continue
                if planner.sits_out_after_verify(j):
                    r.state, r.stall_until = _ST_STALL, plan.step + 1
                else:
                    starting.append(r)
        # after every other request's state is final, so phase loads are exact; first cycles see the others' new ones
        self.planner.begin_cycles([r for r in starting if not r.is_finished], self.step, self.running)
        self.planner.begin_cycles(entering, self.step, self.running, first=True)

    def launch_decodes(self, decodes: Sequence[tuple[StepEntry, int]]) -> None:
        """Overlap, plain decodes (1-token verifies, just launched): apply them before their tokens are known.
        Each ``(entry, token)``'s ``token`` is a placeholder (overlap.py) that becomes the request's last output
        token, so the next step runs on it (patched on the device). The stop checks wait for the value
        (``confirm_decode``): a request that turns out to have stopped has had at most one more step computed, whose
        token is dropped. At its length limit a request sits out (held) until the value arrives."""
        starting = []
        self.planner.record_plain([e.request for e, _ in decodes])
        for e, token in decodes:
            r = e.request
            r.draft_start = e.start_pos
            r.has_pillars = e.refresh is not _NO_REFRESH
            r.num_computed_tokens = e.start_pos + 1
            r.output_token_ids.append(token)
            r.num_pending += 1
            if self._at_length(r):
                self.hold(r)
            else:
                starting.append(r)
        self.planner.begin_cycles(starting, self.step, self.running)

    def confirm_decode(self, r: Request, idx: int, token: int, value: int) -> bool:
        """The value of a ``launch_decode`` placeholder arrived: put it in place and apply the stop checks that
        waited for it. False if the token is dropped (the request had already finished, or stopped before it)."""
        if r.state is _ST_FINISHED or idx >= len(r.output_token_ids) or r.output_token_ids[idx] != token:
            return False
        r.output_token_ids[idx] = value
        r.num_pending -= 1
        if self._stops(r, value, idx + 1):
            del r.output_token_ids[idx + 1:]  # computed after the stop, never emitted
            r.num_pending = 0
            self._finish(r, "stop")
        elif r.num_pending == 0 and self._at_length(r):
            self._finish(r, "length")
        return True

    def hold(self, r: Request) -> None:
        """Overlap: ``r`` (a verify, or a prefill that ends its prompt) ran in the step just launched and its result
        is still on the device: it sits out every step until ``release`` — at least the next one, which is the
        delayed verification schedule. Its ``update`` comes with the release."""
        r.state, r.stall_until, r.held = _ST_STALL, self.step + 1, True

    def release(self, r: Request) -> None:
        r.held = False

    @staticmethod
    def _check_result(e: StepEntry, toks: list[int]) -> str | None:
        """Why ``toks`` cannot be the result of entry ``e`` (an engine bug, confined to that request), or None.
        A DRAFT result may be a negative placeholder (overlap: the token is still on the device)."""
        if e.kind is _DRAFT and len(toks) == 1:
            return None
        if toks and min(toks) < 0:
            return f"negative token id in step result {toks}"
        if e.kind is _VERIFY:
            if not 1 <= len(toks) <= e.num_tokens or toks[:-1] != list(e.token_ids[1:len(toks)]):
                return f"verify result {toks} inconsistent with drafts {list(e.draft_token_ids)}"
        elif len(toks) < e.num_logits:
            return f"{e.kind.value} step expected {e.num_logits} sampled token(s), got {toks}"
        return None

    # ---- the stop check -----------------------------------------------------------------------------------------
    def _at_length(self, r: Request, num_output: int | None = None) -> bool:
        n = len(r.output_token_ids) if num_output is None else num_output
        return n >= r.params.max_tokens or len(r.prompt_token_ids) + n >= self.max_model_len

    def _stops(self, r: Request, token: int, num_output: int) -> bool:
        """``r`` stops once ``token`` is its ``num_output``-th output token: a stop id, EOS unless ignored, or a stop
        string completed."""
        p = r.params
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            return True
        return r.stop_check is not None and r.stop_check(r.output_token_ids, num_output)

    def _stop_reason(self, r: Request, token: int, num_output: int) -> str | None:
        """Why ``r`` stops once ``token`` is its ``num_output``-th output token: "stop" (``_stops``), "length"
        (max_tokens or max_model_len reached), or None."""
        if self._stops(r, token, num_output):
            return "stop"
        return "length" if self._at_length(r, num_output) else None

    def _append(self, r: Request, toks: list[int]) -> bool:
        """Append sampled tokens up to the first stop; True if ``r`` finished."""
        out = r.output_token_ids
        if r.stop_check is None and not self._at_length(r, len(out) + len(toks)):
            # The usual case: the whole chunk at once when none of its ids stops (without stop strings only an id
            # can stop it before the length limit, and that limit is monotone in the count): the loop's result
            p = r.params
            stops, eos = p.stop_token_ids, () if p.ignore_eos else self.eos_token_ids
            for t in toks:
                if t in stops or t in eos:
                    break
            else:
                out += toks
                return False
        for t in toks:
            r.output_token_ids.append(t)
            why = self._stop_reason(r, t, len(r.output_token_ids))
            if why:
                self._finish(r, why)
                return True
        return False

    def _finish(self, r: Request, reason: str) -> None:
        """Finish ``r`` from any state (running, held, waiting after a preemption, offloaded)."""
        if r.state is _ST_WAITING and r in self.waiting:
            self.waiting.remove(r)
        elif r.state not in (_ST_SWAPPED, _ST_FINISHED) and r in self.running:
            self.running.remove(r)
        self.kv.release(r)
        r.state = _ST_FINISHED
        r.stall_until, r.held = -1, False
        r.finish_reason = reason
        r.metrics.finish_step = self.step
        self._finished.append(r)
