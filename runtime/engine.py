"""The engine loop: schedule → build step inputs → run the compiled graph → sample / verify → update.

One step runs every scheduled request — prefill chunks, sparse drafts and full verifies — through ONE call of
the compiled graph on a flattened ragged batch; the attention op reads the ForwardContext to tell them apart.

``Engine.step`` runs the stages in order; where each one is:

* schedule — ``Scheduler.schedule`` (scheduler.py) hands over a sealed StepPlan; its swaps run in ``_apply_swaps``;
* launch — ``Engine._launch``: the forward (``_forward``: a graphed shape or the step's exact one), sampling and
  verification (step_sampler.py); the results stay on the device, copying to the host (step_results.py);
* resolve — step_resolve.py: read the results and apply them through ``Scheduler.update``, where acceptance is
  counted (cycle_planner.py ``record_verify``).

Without overlap a step is resolved right after its launch. With overlap (overlap.py) the engine keeps one step in
flight (``_inflight``) and resolves it while the device runs the next; what needs no value of it was applied when
it launched (``apply_at_launch``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time

import torch

from sparsespec_compile import kernels
from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.kernels.tuning import frozen_tuning

from .block_allocator import BlockAllocator
from .cycle_planner import CycleStats
from .cuda_graphs import StepGraphs
from .engine_stats import EngineStats
from .padded_step import BlockTableMirror, pack_step, packed_logits
from .host_copy import to_device
from .overlap import apply_at_launch, apply_patch, patch_from
from .kv_cache import allocate_kv_cache, allocate_pillar_store, kv_shape_from_config, pages_for_requests
from .offload import HostKVPool, default_host_pages
from .parallel import drop_backward_hooks, local_kv_heads, tp_world_size
from .request import Request
from .scheduler import Scheduler
from .servable import probe_compiled
from .speculation_gate import SpeculationGate, default_gate
from .step_cost import StepCostModel, step_work
from .step_plan import Refresh, StepKind, StepPlan
from .stride_policy import AdaptiveStride, FixedStride
from .step_resolve import StepResolver, fail_step
from .step_results import StepResults
from .step_sampler import StepSampler
from .step_forward import draft_split, run_packed
from .step_shapes import exact_shape

log = logging.getLogger("sparsespec.runtime")


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
        self._inflight: StepResults | None = None  # overlap: the step launched last, its results not yet read
        self.sampler = StepSampler()  # sampling and verification of a step's logits; keeps drafts' q_i
        self.resolver = StepResolver(self.scheduler, config, self.pillars, tp_world=self.tp_world,
                                     on_cuda=self.device.type == "cuda")

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

        Schedule, launch (forward + sampling + verification, results left on the device), then resolve a step
        (step_resolve.py: read its results and apply them). Without overlap (depth 0) that is this step; with
        overlap (depth 1, overlap.py) it is the previous one, read while the device runs this one."""
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
            self.resolver.resolve(ready, self.stats, self.step_cost)
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
                logits, ids = self._forward(plan, patch_from(plan, self._inflight, self.device))
                res = self.sampler.run(plan, logits, ids)
            else:
                logits, _ = self._forward(plan)  # [N, V]
                res = self.sampler.run(plan, logits)
            res.start_event = start
            res.recall_rows, res.recall = self._step_recall(plan)
            res.start_copy()
        except Exception as exc:
            fail_step(self.scheduler, plan.entries, plan.step, exc)
            return None
        res.host_seconds = time.perf_counter() - t0
        res.work = step_work(plan, self.config.budget, self.query_passes)
        self._count_step(plan, res.work)
        if self.overlap:
            apply_at_launch(self.scheduler, res)
        else:
            res.held = list(range(len(plan.entries)))  # depth 0: every entry's update waits for its own result
        return res

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

    def _apply_swaps(self, plan: StepPlan) -> None:
        """Run the plan's restores and offloads (KV pages of every layer and pillar rows, host pool <-> device)
        before the forward. Offloaded requests keep their cycle's draft probabilities here: they resume mid-cycle."""
        if plan.swap_in or plan.swap_out:
            self.offload.execute(plan.swap_in, plan.swap_out)
