"""The engine loop: schedule → build step inputs → run the compiled graph → sample / verify → update.

One step runs every scheduled request — prefill chunks, sparse drafts and full verifies — through ONE call of
the compiled graph on a flattened ragged batch; the attention op reads the ForwardContext to tell them apart.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from sparsespec_compile import kernels
from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.kernels.tuning import frozen_tuning

from .block_allocator import BlockAllocator
from .cycle_planner import CycleStats
from .cuda_graphs import StepGraphs
from .padded_step import BlockTableMirror, pack_step, packed_logits
from .host_copy import to_device
from .overlap import apply_patch, placeholder, placeholder_patch
from .kv_cache import allocate_kv_cache, allocate_pillar_store, kv_shape_from_config, pages_for_requests
from .offload import HostKVPool, default_host_pages
from .parallel import drop_backward_hooks, from_rank0, local_kv_heads, tp_world_size
from .request import Request, RequestState
from .scheduler import Scheduler
from .servable import probe_compiled
from .speculation_gate import SpeculationGate, default_gate
from .step_cost import StepCostModel, step_work
from .step_plan import Refresh, StepEntry, StepKind, StepPlan
from .stride_policy import AdaptiveStride, FixedStride
from .step_results import StepResults
from .step_sampler import StepSampler
from .step_forward import draft_split, run_packed
from .step_shapes import exact_shape
from .streaming_pillars import write_streaming_pillars

log = logging.getLogger("sparsespec.runtime")
# enum members as globals for the per-entry loops (a read off the enum class costs ~0.18 us more on Python 3.11)
_FINISHED = RequestState.FINISHED
_PREFILL, _DRAFT, _VERIFY = StepKind.PREFILL, StepKind.DRAFT, StepKind.VERIFY


@dataclass
class EngineStats:
    steps: int = 0
    forward_tokens: int = 0
    # Requests in each step, summed: / steps = the mean batch a step actually ran. A closed batch of speculative
    # requests drains unevenly (a request that accepts little needs more steps), so the last steps run nearly empty.
    request_steps: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    graph_steps: int = 0  # steps run through StepGraphs (padded static shape, replayed graph on CUDA)
    # CUDA only: device time from a step's first launch to its last result read (events), summed. The rest of
    # ``seconds`` is host time the GPU sat idle (scheduling, input packing, bookkeeping).
    gpu_busy_seconds: float = 0.0
    # Keys each step's attention read (full rows: the context; sparse rows: pillars + dense tail): the KV half of
    # the bytes-moved floor.
    kv_tokens_read: int = 0
    capture_seconds: float = 0.0  # one-off graph warm-up + capture, left out of ``seconds``
    # The graphed (decode-only) steps on their own: their wall time and keys read, for the step-time floor.
    graph_seconds: float = 0.0
    graph_kv_tokens_read: int = 0
    # draft recall (kernels/hybrid.py draft_recall) summed per layer over the scored verifications, and their count
    recall_sum: list[float] = dataclasses.field(default_factory=list)
    recall_verifies: int = 0
    # Host time of the step loop by stage (in ``seconds``): scheduling, launching (packing, the forward's and the
    # sampler's launches), resolving (reading results, the scheduler's update). Where a host-bound step goes.
    schedule_seconds: float = 0.0
    launch_seconds: float = 0.0
    resolve_seconds: float = 0.0  # includes wait_seconds
    wait_seconds: float = 0.0  # blocked on the device for a step's results (host ahead of the GPU: time well spent)


def sliding_windows_from_config(config, num_layers: int) -> list[int]:
    """Per-layer window (-1 = full) as HF builds its masks: ``layer_types`` when given, else one window for all."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None) or -1
    types = getattr(text, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else -1 for t in types][:num_layers]
    use = getattr(text, "use_sliding_window", True)
    return [window if use else -1] * num_layers


class Engine:
    def __init__(self, compiled, model: torch.nn.Module, config: SparseSpecConfig, eos_token_ids=()) -> None:
        self.compiled = compiled
        self.config = config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.impl = config.attention_impl
        if self.impl == "auto":
            self.impl = "triton" if self.device.type == "cuda" else "reference"
        num_layers, kv_heads, head_dim = kv_shape_from_config(model.config)
        self.tp_world = tp_world_size(model)
        dropped = drop_backward_hooks(model)
        if dropped:
            log.warning("removed the backward hooks of %d module(s) (%s%s): inference never runs them and Dynamo "
                        "cannot trace them", len(dropped), ", ".join(dropped[:3]), ", ..." if len(dropped) > 3 else "")
        kv_heads = local_kv_heads(kv_heads, self.tp_world)  # under TP the op sees this rank's heads only
        # Refuses a compiled model whose attention did not all become the op; the K/V shape the op receives sizes
        # the pool (after the hooks are gone: a hook splits the graph)
        kv_layout = probe_compiled(compiled, model, num_layers)
        if kv_layout != (kv_heads, head_dim):
            log.warning("the attention op receives K/V of %d heads x %d (the config says %d x %d): the model repeats "
                        "K/V itself in a form the rewrite does not undo, so the KV pool holds %d heads per layer",
                        *kv_layout, kv_heads, head_dim, kv_layout[0])
            kv_heads, head_dim = kv_layout
        self.num_layers = num_layers
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_model_len = int(getattr(text, "max_position_embeddings", 4096) or 4096)
        self.vocab_size = int(text.vocab_size)
        # how many passes over its keys the attention makes for a row of n queries (the step costs count them)
        q_heads = int(getattr(text, "num_attention_heads", 0) or kv_heads * self.tp_world) // self.tp_world
        self.query_passes = functools.partial(kernels.query_passes, max(q_heads, kv_heads), kv_heads, impl=self.impl)
        self.kv = allocate_kv_cache(
            num_layers, kv_heads, head_dim, dtype=self.dtype, device=self.device, page_size=config.page_size,
            num_pages=config.num_pages, memory_fraction=config.kv_memory_fraction,
            max_pages=pages_for_requests(config.max_num_seqs, self.max_model_len, config.stride, config.page_size),
        )
        max_budget = min(config.max_budget, max(config.min_budget, math.ceil(config.sparsity * self.max_model_len)))
        self.pillars = None
        if config.stride > 0 and config.draft != "full":
            # + 1: a scratch row for the padding score rows of graphed steps (cuda_graphs.py)
            self.pillars = allocate_pillar_store(num_layers, config.max_num_seqs + 1, kv_heads, max_budget,
                                                 self.device)
        self.sliding_windows = sliding_windows_from_config(model.config, num_layers)
        self.offload = None  # host pool of the dynamic KV cache (swaps planned by the scheduler, run by _apply_swaps)
        if config.offload:
            self.offload = HostKVPool(self.kv, self.pillars, config.host_kv_pages or default_host_pages(self.kv),
                                      config.max_num_seqs, config.offload_chunk_pages)
        # overlap: launch step i+1 before reading step i's results (auto: on for one CUDA device). Delayed verification
        # at stride > 0; at stride 0 a plain decode's token enters the next step as a placeholder instead.
        auto = self.device.type == "cuda" and self.tp_world == 1
        self.overlap = auto if config.overlap is None else config.overlap
        if self.overlap and self.tp_world > 1:
            raise ValueError("overlap=True is not supported with tensor parallelism yet (ranks agree on tokens "
                             "on the host every step): use overlap=False")
        # The adaptive stride's prices: fitted to this engine's own step times (step_cost.py); tests inject theirs.
        self.step_cost = StepCostModel()
        # ... and whether the batch speculates at all: by its measured goodput against plain decoding
        self.gate = default_gate(config.adaptive, config.stride, self.tp_world)
        if config.adaptive and config.stride > 0:
            policy = AdaptiveStride(config.stride, self.step_cost, config.budget, sparse_drafts=self.pillars is not None,
                                    delayed_verify=self.overlap, passes=self.query_passes, gate=self.gate)
        else:
            policy = FixedStride(config.stride)
        self.scheduler = Scheduler(
            BlockAllocator(self.kv.num_pages, config.page_size),
            stride=config.stride,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=eos_token_ids,
            delayed_verify=self.overlap,
            num_host_blocks=self.offload.num_pages if self.offload is not None else 0,
            max_oversubscription=config.kv_oversubscription,
            draft=config.draft,
            policy=policy,
        )
        self.use_gate(self.gate)  # (the gate asks the scheduler how many steps are left: attached once it exists)
        self.stats = EngineStats()  # steps and time; acceptance is counted by the cycle planner (CycleStats)
        graphs = config.cuda_graphs
        if graphs == "auto":
            graphs = "on" if self.device.type == "cuda" and self.tp_world == 1 else "off"
        self.graphs = None
        if graphs != "off":
            self.graphs = StepGraphs(compiled, self.kv, self.pillars, config, self.sliding_windows, self.impl,
                                     self.device, num_layers, capture=graphs == "on")
        # One block-table mirror for both paths (the graphs' when there are graphs): np.asarray of every request's
        # table each step cost ~0.4 ms of an eager pack at B 256.
        self.tables = self.graphs.tables if self.graphs is not None else BlockTableMirror()
        self._inflight: StepResults | None = None
        self.sampler = StepSampler()  # sampling and verification of a step's logits; keeps drafts' q_i

    def reset_stats(self) -> None:
        """Count afresh from now on: steps and time (EngineStats), and every cycle's acceptance (CycleStats)."""
        self.stats = EngineStats()
        self.scheduler.planner.stats = CycleStats.empty(self.config.stride)

    def use_gate(self, gate: SpeculationGate | None) -> None:
        """Switch speculation on and off for the whole batch with ``gate`` (speculation_gate.py; None: the prices
        alone decide)."""
        self.gate = gate
        if gate is not None:
            gate.remaining = self._steps_left
        policy = self.scheduler.planner.policy
        if isinstance(policy, AdaptiveStride):
            policy.gate = gate

    def use_step_cost(self, cost) -> None:
        """Price the adaptive stride with ``cost`` (``coefficients()``, ``observe()``; e.g. ``FixedStepCost`` in tests,
        where CPU step times say nothing about a GPU's) instead of the fit to this engine's own steps. The given
        prices then decide alone: the speculation gate, which measures this engine's goodput, is removed."""
        self.step_cost = cost
        policy = self.scheduler.planner.policy
        if isinstance(policy, AdaptiveStride):
            policy.cost = cost
        self.use_gate(None)

    def _steps_left(self) -> int:
        """Decode steps the batch has left at least: the most tokens a running or waiting request may still emit
        (an EOS can end it sooner)."""
        s = self.scheduler
        return max((min(r.params.max_tokens - len(r.output_token_ids), self.max_model_len - r.num_tokens)
                    for r in itertools.chain(s.running, s.waiting)), default=0)

    # ---- requests -------------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> bool:
        return self.scheduler.add(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    # ---- one step -------------------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one step; returns the requests the scheduler reported finished (each exactly once, rejected and
        aborted ones included; a request finishing in this step is reported by the next one).

        Schedule, launch (forward + sampling + verification, results left on the device), then read a step's
        results and apply them. Without overlap (depth 0) that is this step's; with overlap (depth 1, overlap.py)
        it is the previous step's, read while the device runs this one."""
        t0 = time.perf_counter()  # the step's wall time includes scheduling: host time the GPU may idle through
        captured_before = self._captured()
        tokens_before = self.stats.output_tokens
        plan = self.scheduler.schedule()
        self._apply_swaps(plan)
        self.sampler.forget(plan.finished + plan.preempted)  # a preempted request restarts its cycle: drop its q_i
        graph_steps_before = self.stats.graph_steps
        t1 = time.perf_counter()
        launched = self._launch(plan) if plan.entries else None
        t2 = time.perf_counter()
        capture = self._captured() - captured_before
        if launched is not None and capture:
            launched.start_event = None  # a step that captured a graph: its device time includes the warm-up
        if self.overlap:
            ready, self._inflight = self._inflight, launched
        else:
            ready = launched
        if ready is not None:  # with overlap the device is running `launched` meanwhile: this host work overlaps it
            self._resolve(ready)
        t3 = time.perf_counter()
        # A step that captured a graph counts without its capture time (one-off, reported as capture_seconds).
        wall = t3 - t0 - capture
        self.stats.seconds += wall
        self.stats.schedule_seconds += t1 - t0
        self.stats.launch_seconds += t2 - t1 - capture
        self.stats.resolve_seconds += t3 - t2
        if self.gate is not None and plan.entries:
            # wall time (what the user waits for, host-bound steps included) of decode steps only: a prefill chunk
            # costs the same in either mode, and one 50-500 ms prefill step in a 192-step window decided a round
            decode = not capture and all(e.kind is not StepKind.PREFILL for e in plan.entries)
            self.gate.observe(self.stats.output_tokens - tokens_before, wall if decode else 0.0, len(plan.entries))
        self.stats.capture_seconds += capture
        if launched is not None and self.stats.graph_steps > graph_steps_before:
            self.stats.graph_seconds += wall  # (with overlap: this launch and the previous step's bookkeeping)
            self.stats.graph_kv_tokens_read += launched.work.kv_tokens_read
        return plan.finished

    def _captured(self) -> float:
        return self.graphs.capture_seconds if self.graphs is not None else 0.0

    def _launch(self, plan: StepPlan) -> StepResults | None:
        """Forward, sampling and verification of ``plan``, their results copying to the host; None if it failed (its
        requests are finished with the error, the others keep going)."""
        start = None
        if self.device.type == "cuda":  # reached by the device when it starts this step: busy time, not queueing
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        try:
            if self.overlap:
                logits, ids = self._forward(plan, self._patch(plan))
                res = self.sampler.run(plan, logits, ids)
            else:
                logits, _ = self._forward(plan)  # [N, V]
                res = self.sampler.run(plan, logits)
            res.start_event = start
            res.recall_rows, res.recall = self._step_recall(plan)
            res.start_copy()
        except Exception as exc:
            self._fail(plan.entries, plan.step, exc)
            return None
        res.host_seconds = time.perf_counter() - t0
        res.work = step_work(plan, self.config.budget, self.query_passes)
        self._count_step(plan, res.work)
        if self.overlap:
            self._launched_structure(res)
        else:
            res.held = list(range(len(plan.entries)))  # depth 0: every entry's update waits for its own result
        return res

    def _fail(self, entries, step: int, exc: Exception) -> None:
        log.exception("step %d failed", step)
        for e in entries:
            self.scheduler.abort(e.request, f"error: step failed: {exc}")

    def _patch(self, plan: StepPlan):
        dst, src = placeholder_patch(plan)
        if not dst.size:
            return None
        prev = self._inflight
        if prev is None or prev.sampled is None:
            raise RuntimeError(f"step {plan.step} has placeholder inputs but no step in flight to take them from")
        index = to_device(torch.from_numpy(np.stack((dst, src))), self.device)  # one copy for both: [2, n]
        return index[0], index[1], prev.sampled

    def _launched_structure(self, res: StepResults) -> None:
        """Overlap: what the scheduler can apply before the values exist: drafts go in as placeholders; a plain
        decode runs on with a placeholder token; a verify or a prompt-ending prefill is held (sits out) until its
        result is read."""
        row_of = {i: j for j, i in enumerate(res.sample_rows)}
        sched = self.scheduler
        sits_out = sched.planner.sits_out_after_verify
        now, decodes, res.held, res.placeholders = [], [], [], []
        held, placeholders = res.held, res.placeholders
        for i, e in enumerate(res.plan.entries):
            r = e.request
            if r.state is _FINISHED:
                continue
            kind = e.kind
            if kind is _DRAFT:
                row = row_of[i]
                now.append((e, [placeholder(row)]))
                placeholders.append((r, len(r.draft_token_ids), row))
            elif kind is _PREFILL and not e.num_logits:
                now.append((e, []))
            elif kind is _VERIFY and not sits_out(e.num_tokens - 1):
                # a plain decode (stride 0, or an adaptive k = 0): runs on, its token pending
                row = row_of[i]
                res.decodes.append((r, len(r.output_token_ids), row))
                decodes.append((e, placeholder(row)))
            else:
                sched.hold(r)
                held.append(i)
        if now:
            self.scheduler.update(StepPlan(res.plan.step, entries=[e for e, _ in now]), [t for _, t in now])
        self.scheduler.launch_decodes(decodes)  # after the drafts: their next cycles see every phase as it is

    def _resolve(self, res: StepResults) -> None:
        """Read a step's results (waits for its copies): fill its draft placeholders, confirm its plain decodes,
        apply the held updates. Feeds the step's measured time to the step-cost model."""
        try:
            t0 = time.perf_counter()
            local = res.lists()
            self.stats.wait_seconds += time.perf_counter() - t0
            busy = res.device_seconds()
            # The step's measured time prices the adaptive stride: device time on CUDA (events), the CPU's own time
            # for the forward and sampling elsewhere. Rank 0's, with its tokens: every rank must choose the same k.
            values, seconds = from_rank0((local, busy if busy is not None else res.host_seconds), self.tp_world)
        except Exception as exc:  # confined to this step's requests; the others keep going
            self._fail([res.plan.entries[i] for i in res.held], res.plan.step, exc)
            return
        if busy is not None:
            self.stats.gpu_busy_seconds += busy
        if (busy is not None or self.device.type != "cuda") and self.scheduler.planner.policy.adaptive:
            # (on CUDA a step without device time captured a graph: its host time, up to 14 s on the H200, is no
            # price of its work; fed in, it made c_tok 700 us a token). Only the adaptive stride reads the prices
            # (and LLM.stats only then reports them): a fixed stride skips the fit, whose outlier check solved the
            # 4-coefficient NNLS (15 supports) every step: 0.6-1.0 ms a step, micro-timed on a loaded 2-core CPU.
            self.step_cost.observe(res.work, seconds)
        for i, per_layer in res.recall_lists():
            res.plan.entries[i].request.metrics.add_recall(per_layer)
            s = self.stats
            s.recall_sum = [a + b for a, b in zip(s.recall_sum or [0.0] * len(per_layer), per_layer)]
            s.recall_verifies += 1
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
        self.stats.output_tokens += confirmed
        if not res.held:
            return
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
        self.stats.output_tokens += sum(len(e.request.output_token_ids) for e in entries) - sum(lengths)
        for i, e, before in zip(res.held, entries, lengths):  # the tokens the update kept (a stop cuts the rest)
            if i in logprobs:
                e.request.output_logprobs += logprobs[i][: len(e.request.output_token_ids) - before]

    def _count_step(self, plan: StepPlan, work) -> None:
        self.stats.steps += 1
        self.stats.forward_tokens += plan.num_tokens
        self.stats.request_steps += len(plan.entries)
        self.stats.kv_tokens_read += work.kv_tokens_read

    def _forward(self, plan: StepPlan, patch=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, V], input ids [T'] the step ran on, T' >= T with padding); ``patch``: overlap placeholders."""
        if self.graphs is not None:
            shape = self.graphs.shape_for(plan)
            if shape is not None:
                self.stats.graph_steps += 1
                return self.graphs.run(plan, shape, patch)
        # the step at its own size, through the same packed buffer and context builder as a graphed step
        shape = exact_shape(plan)
        self.tables.sweep(plan)
        host = pack_step(plan, shape, self.config, self.kv.page_size, scratch_slot=0,  # (exact: no padding rows)
                         tables=self.tables)
        packed = to_device(torch.from_numpy(host), self.device)
        apply_patch(packed, patch)  # placeholders sit in the first T entries: the input ids
        # an exact shape runs once: its kernels reuse configs already tuned (kernels/tuning.py; a new autotuning key
        # here benchmarked every config inside the step: 482 ms prefill steps on the H200)
        with frozen_tuning():
            logits = run_packed(self.compiled, packed, shape, kv=self.kv, pillars=self.pillars,
                                recent=self.config.recent, sliding_windows=self.sliding_windows, impl=self.impl,
                                num_layers=self.num_layers, split=draft_split(self.config))
        return logits[: packed_logits(plan)], packed[: shape.tokens]

    def _step_recall(self, plan: StepPlan) -> tuple[list[int], torch.Tensor | None]:
        """The scored verifications of ``plan`` and their draft recall per layer ([n, L] on the device, read with the
        step's other results): what select_step_pillars wrote into the PillarStore during the forward."""
        if self.pillars is None or self.pillars.recall is None:
            return [], None
        score = Refresh.SCORE
        rows, slots = [], []  # one pass over the entries
        for i, e in enumerate(plan.entries):
            if e.refresh is score:
                rows.append(i)
                slots.append(e.request.pillar_slot)
        if not rows:
            return [], None
        return rows, self.pillars.recall.index_select(1, to_device(slots, self.device)).t()

    def _write_streaming_pillars(self, plan: StepPlan) -> None:
        """Streaming drafts: the verified rows' next draft sets (sinks + newest window), one write for the step."""
        streaming: list[tuple[int, int, int]] = []  # (slot, context, budget) of verified streaming requests
        for e in plan.entries:
            r = e.request
            if e.refresh is Refresh.STREAMING and not r.is_finished and r.state.value != "waiting":
                streaming.append((r.pillar_slot, e.start_pos, self.config.budget(e.start_pos)))
        if streaming:
            write_streaming_pillars(self.pillars, *map(list, zip(*streaming)))

    def _apply_swaps(self, plan: StepPlan) -> None:
        """Run the plan's restores and offloads (KV pages of every layer and pillar rows, host pool <-> device)
        before the forward. Offloaded requests keep their cycle's draft probabilities here: they resume mid-cycle."""
        if plan.swap_in or plan.swap_out:
            self.offload.execute(plan.swap_in, plan.swap_out)
