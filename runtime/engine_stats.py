"""The engine's counters: steps, tokens and time (acceptance is counted apart, by the cycle planner: CycleStats)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
