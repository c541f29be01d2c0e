"""Resolving a step: read its results off the device and apply them — the engine's last stage of a step.

Without overlap the engine resolves a step right after launching it; with overlap (overlap.py) it resolves the
previous step while the device runs this one, and part of the step was applied at launch already
(``apply_at_launch``): here its draft placeholders get their values, its plain decodes are confirmed (the stop
checks), and its held verifies and prompt-ending prefills are applied through ``Scheduler.update`` — where the
cycle planner counts acceptance (``CyclePlanner.record_verify``). The step's measured time prices the adaptive
stride (``StepCostModel.observe``); its draft recall is summed into the stats.
"""

from __future__ import annotations

import logging
import time

from sparsespec_compile.context import PillarStore
from sparsespec_compile.config import SparseSpecConfig

from .engine_stats import EngineStats
from .overlap import placeholder
from .parallel import from_rank0
from .scheduler import Scheduler
from .step_plan import Refresh, StepEntry, StepPlan
from .step_results import StepResults
from .streaming_pillars import write_streaming_pillars

log = logging.getLogger("sparsespec.runtime")


def fail_step(scheduler: Scheduler, entries, step: int, exc: Exception) -> None:
    """A step's launch or resolution raised: finish its ``entries``' requests with the error (others keep going)."""
    log.exception("step %d failed", step)
    for e in entries:
        scheduler.abort(e.request, f"error: step failed: {exc}")


class StepResolver:
    def __init__(self, scheduler: Scheduler, config: SparseSpecConfig, pillars: PillarStore | None, *,
                 tp_world: int, on_cuda: bool) -> None:
        self.scheduler, self.config, self.pillars = scheduler, config, pillars
        self.tp_world, self.on_cuda = tp_world, on_cuda

    def resolve(self, res: StepResults, stats: EngineStats, step_cost) -> None:
        """Read ``res`` (waits for its copies): fill its draft placeholders, confirm its plain decodes, apply the
        held updates; count into ``stats``; feed the step's measured time to ``step_cost`` (adaptive stride only)."""
        try:
            t0 = time.perf_counter()
            local = res.lists()
            stats.wait_seconds += time.perf_counter() - t0
            busy = res.device_seconds()
            # The step's measured time prices the adaptive stride: device time on CUDA (events), the CPU's own time
            # for the forward and sampling elsewhere. Rank 0's, with its tokens: every rank must choose the same k.
            values, seconds = from_rank0((local, busy if busy is not None else res.host_seconds), self.tp_world)
        except Exception as exc:  # confined to this step's requests; the others keep going
            fail_step(self.scheduler, [res.plan.entries[i] for i in res.held], res.plan.step, exc)
            return
        if busy is not None:
            stats.gpu_busy_seconds += busy
        if (busy is not None or not self.on_cuda) and self.scheduler.planner.policy.adaptive:
            # (on CUDA a step without device time captured a graph: its host time, up to 14 s on the H200, is no
            # price of its work; fed in, it made c_tok 700 us a token). Only the adaptive stride reads the prices
            # (and LLM.stats only then reports them): a fixed stride skips the fit, whose outlier check solved the
            # 4-coefficient NNLS (15 supports) every step: 0.1-0.13 ms a step, micro-timed on a loaded 2-core CPU.
            step_cost.observe(res.work, seconds)
        for i, per_layer in res.recall_lists():
            res.plan.entries[i].request.metrics.add_recall(per_layer)
            stats.recall_sum = [a + b for a, b in zip(stats.recall_sum or [0.0] * len(per_layer), per_layer)]
            stats.recall_verifies += 1
        for r, idx, row in res.placeholders:
            if idx < len(r.draft_token_ids) and r.draft_token_ids[idx] == placeholder(row):
                r.draft_token_ids[idx] = values[res.sample_rows[row]][0]
        logprobs = {}  # entry index -> per-slot {token: log-prob}, for the requests that asked
        for part in res.logprobs or ():
            logprobs.update(part.per_entry())
        sample_rows, confirm, confirmed = res.sample_rows, self.scheduler.confirm_decode, 0
        for r, idx, row in res.decodes:
            i = sample_rows[row]
            if confirm(r, idx, placeholder(row), values[i][0]):
                confirmed += 1
                if i in logprobs and len(r.output_token_ids) > idx:
                    r.output_logprobs.append(logprobs[i][0])
        stats.output_tokens += confirmed
        if res.held:
            self._apply_held(res, values, logprobs, stats)

    def _apply_held(self, res: StepResults, values: list[list[int]], logprobs: dict, stats: EngineStats) -> None:
        """The updates that waited for their values (every entry without overlap): ``Scheduler.update`` on them."""
        ids, offsets, all_entries = None, None, res.plan.entries
        entries = []
        for i in res.held:
            e = all_entries[i]
            if min(e.token_ids) < -1:  # a verify chunk that ran on a placeholder: the real tokens
                ids = ids if ids is not None else res.host_input_ids()
                offsets = offsets if offsets is not None else res.plan.token_offsets()
                # (dataclasses.replace by hand: 17 us a call under cProfile, one per verify chunk)
                e = StepEntry(e.request, e.kind, tuple(ids[offsets[i]:offsets[i] + e.num_tokens]), e.start_pos,
                              e.num_logits, e.sparse, e.refresh, e.draft_start)
            self.scheduler.release(e.request)
            entries.append(e)
        sub = StepPlan(res.plan.step, entries=entries)
        lengths = [len(e.request.output_token_ids) for e in entries]
        self.scheduler.update(sub, [values[i] for i in res.held])
        self._write_streaming_pillars(sub)
        stats.output_tokens += sum(len(e.request.output_token_ids) for e in entries) - sum(lengths)
        for i, e, before in zip(res.held, entries, lengths):  # the tokens the update kept (a stop cuts the rest)
            if i in logprobs:
                e.request.output_logprobs += logprobs[i][: len(e.request.output_token_ids) - before]

    def _write_streaming_pillars(self, plan: StepPlan) -> None:
        """Streaming drafts: the verified rows' next draft sets (sinks + newest window), one write for the step."""
        streaming: list[tuple[int, int, int]] = []  # (slot, context, budget) of verified streaming requests
        for e in plan.entries:
            r = e.request
            if e.refresh is Refresh.STREAMING and not r.is_finished and r.state.value != "waiting":
                streaming.append((r.pillar_slot, e.start_pos, self.config.budget(e.start_pos)))
        if streaming:
            write_streaming_pillars(self.pillars, *map(list, zip(*streaming)))
