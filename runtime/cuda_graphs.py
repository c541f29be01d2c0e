"""Decode steps as CUDA graphs, one per StepShape (captured on first use), fed by one packed metadata copy.

Why: HF's eager forward costs ~95 ms of host time for ~7 ms of GPU work at batch 64 (SmolLM2 shape, H200, see
bench/RESULTS.md); a graph replays a whole step — every layer's projections, the sparsespec attention ops, the
pillar refresh and the LM head — as one launch.

What makes a step capturable (and why the rest of the runtime is written the way it is):

* every tensor the graph reads lives at a fixed address: the KV pool and the PillarStore are allocated once, and
  the step metadata is unpacked inside the graph from one static buffer (padded_step.py);
* every host int the kernels are launched with is a property of the shape: T, R, Rv, ``max_query_len`` and
  ``max_seq_len`` are the shape's bucket maxima, never the step's own values;
* nothing syncs: the attention op, the Triton launchers and the pillar refresh never read device values on the
  host (``pillar_scores`` gets ``max_ctx`` from the shape).

``capture=False`` runs the same padded static-shape path without graphs: what the CPU tests use to prove the
padding exact (the graph only replays these kernels).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.context import PagedKVCache, PillarStore

from .host_copy import pinned_for
from .overlap import apply_patch
from .padded_step import BlockTableMirror, pack_step, packed_logits
from .step_forward import draft_split, run_packed
from .step_plan import StepPlan
from .step_shapes import StepShape, shape_for

log = logging.getLogger("sparsespec.runtime")


@dataclass
class _Entry:
    packed: torch.Tensor  # static device buffer the graph reads
    logits: torch.Tensor  # static output [T, V]
    graph: torch.cuda.CUDAGraph | None


class StepGraphs:
    def __init__(self, compiled, kv: PagedKVCache, pillars: PillarStore | None, config: SparseSpecConfig,
                 sliding_windows: list[int], impl: str, device: torch.device, num_layers: int, capture: bool) -> None:
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {device}")
        self.compiled, self.kv, self.pillars, self.config = compiled, kv, pillars, config
        self.sliding_windows, self.impl, self.device, self.num_layers = sliding_windows, impl, device, num_layers
        self.capture = capture
        # The last PillarStore row is reserved (the engine allocates max_num_seqs + 1): padding score rows write there.
        self.scratch_slot = pillars.indices.shape[1] - 1 if pillars is not None else 0
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._entries: dict[StepShape, _Entry] = {}
        self.tables = BlockTableMirror()  # shared with the engine's eager steps
        self._host: dict[int, np.ndarray] = {}  # packing scratch per buffer size (copied to pinned memory per step)
        self.capture_seconds = 0.0
        self.steps = 0
        # Logits land in a few shared buffers (capacity a power of two >= T) instead of each graph keeping its own
        # output alive in the pool: Qwen3-8B's [T, 151,936] bf16 logits are ~40 MB at T = 144 and a run captures
        # ~100 shapes (114 for SmolLM2 at batch 64, bench/RESULTS.md). One extra copy per step (~3 us there).
        self._logits_bufs: dict[int, torch.Tensor] = {}

    @property
    def num_graphs(self) -> int:
        return len(self._entries)

    def shape_for(self, plan: StepPlan) -> StepShape | None:
        return shape_for(plan, self.config.stride, self.kv.page_size, self.config.max_num_batched_tokens)

    def run(self, plan: StepPlan, shape: StepShape, patch=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[N, V]`` of the plan's ``logits_indices``, input ids ``[T]`` the step ran on) — views of static
        buffers: read them (or enqueue what reads them) before the next step. ``patch``: overlap placeholders."""
        self.tables.sweep(plan)
        host = self._host.get(shape.packed_size)
        if host is None:
            host = self._host[shape.packed_size] = np.zeros(shape.packed_size, dtype=np.int64)
        pack_step(plan, shape, self.config, self.kv.page_size, self.scratch_slot, out=host, tables=self.tables)
        entry = self._entries.get(shape)
        if entry is None:
            entry = self._new_entry(shape, host, patch)
        else:
            self._upload(entry.packed, host, patch)
            if entry.graph is not None:
                entry.graph.replay()
            else:
                self._forward(entry.packed, shape, entry.logits)
        self.steps += 1
        return entry.logits[: packed_logits(plan)], entry.packed[: shape.tokens]

    def _upload(self, packed: torch.Tensor, host: np.ndarray, patch) -> None:
        # Through a fresh pinned copy: the next step may repack `host` while this copy is still queued.
        packed.copy_(pinned_for(torch.from_numpy(host), self.device), non_blocking=True)
        apply_patch(packed, patch)  # placeholders sit in the first T entries: the input ids

    def _new_entry(self, shape: StepShape, host: np.ndarray, patch) -> _Entry:
        t0 = time.perf_counter()
        packed = torch.zeros(shape.packed_size, dtype=torch.int64, device=self.device)
        self._upload(packed, host, patch)
        if not self.capture:
            first = self._forward(packed, shape)
            logits = self._logits_view(shape, first)
            logits.copy_(first)
            return self._store(shape, _Entry(packed, logits, None))
        # Warm-up on a side stream (what torch.cuda.graph requires): Dynamo compiles for this shape and Triton
        # compiles / autotunes every launch, none of which may happen during capture. The warm-up really runs the
        # step; its writes (this step's K/V, its pillar refresh) are recomputed identically by the replay below.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            first = self._forward(packed, shape)
        torch.cuda.current_stream(self.device).wait_stream(side)
        logits = self._logits_view(shape, first)  # allocated on the replay stream, not the side one
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(packed, shape, logits)  # its own output is freed after capture: the pool reuses it
        graph.replay()  # capture records without running
        self.capture_seconds += time.perf_counter() - t0
        log.info("captured a CUDA graph for %s in %.2f s (%d graphs)", shape, time.perf_counter() - t0,
                 len(self._entries) + 1)
        return self._store(shape, _Entry(packed, logits, graph))

    def _store(self, shape: StepShape, entry: _Entry) -> _Entry:
        self._entries[shape] = entry
        return entry

    def _logits_view(self, shape: StepShape, like: torch.Tensor) -> torch.Tensor:
        """``[shape.tokens, V]`` view of the shared logits buffer of capacity the next power of two."""
        cap = 1 << (shape.tokens - 1).bit_length()
        buf = self._logits_bufs.get(cap)
        if buf is None:
            buf = self._logits_bufs[cap] = like.new_empty(cap, like.shape[-1])
        return buf[: shape.tokens]

    def _forward(self, packed: torch.Tensor, shape: StepShape, out: torch.Tensor | None = None) -> torch.Tensor:
        """Run the padded step; the logits are copied into ``out`` when given (inside a capture: a static buffer)."""
        logits = run_packed(self.compiled, packed, shape, kv=self.kv, pillars=self.pillars, recent=self.config.recent,
                            sliding_windows=self.sliding_windows, impl=self.impl, num_layers=self.num_layers,
                            split=draft_split(self.config))
        if out is not None:
            out.copy_(logits)
        return logits

