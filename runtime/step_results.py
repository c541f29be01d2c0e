"""What one step produced, still on the device: sampled tokens and verify results, read on the host later.

The synchronous engine reads them at once (``lists()``); with ``overlap`` the engine launches the next step first
and reads these while the device runs it (delayed verification: the requests whose results are pending sit that
step out, and the others' inputs that depend on them are placeholders patched on the device — see overlap.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .step_cost import StepWork
from .step_plan import StepPlan


@dataclass
class StepResults:
    plan: StepPlan
    sample_rows: list[int]  # entries that sampled one token (prefill ends, drafts, plain decodes), in order
    sampled: torch.Tensor | None  # [len(sample_rows)] int64 on the device
    verify_rows: list[int]  # VERIFY entries, in order
    verify_tokens: torch.Tensor | None  # [len(verify_rows), k+1] int64 on the device, -1 past each row's result
    input_ids: torch.Tensor | None = None  # [T] int64 the step ran on (placeholders patched), when kept
    # overlap bookkeeping (overlap.apply_at_launch): entries held until these results are read, and the
    # placeholders their drafts were recorded as: (request, index in draft_token_ids, row in `sampled`)
    held: list[int] = field(default_factory=list)
    placeholders: list[tuple] = field(default_factory=list)
    # stride 0: plain decodes applied with a placeholder output token: (request, index in output_token_ids, row)
    decodes: list[tuple] = field(default_factory=list)
    logprobs: list | None = None  # logprobs.StepLogprobs parts, when a request asked (read with the results)
    start_event: torch.cuda.Event | None = None  # recorded before the step's first device op (GPU busy time)
    work: StepWork = field(default_factory=StepWork)  # what the step asked of the device (step_cost.py)
    host_seconds: float = 0.0  # host time of its launch (forward, sampling, verification): the CPU's step time
    # draft-recall telemetry: the entries whose verification scored the context, and their next drafts' recall per
    # layer ([len(recall_rows), num_layers] fp32 on the device; PillarStore.recall read after the forward)
    recall_rows: list[int] = field(default_factory=list)
    recall: torch.Tensor | None = None
    # one tensor whose views `sampled` (first) and `verify_tokens` (next) are, when they are (StepSampler's greedy
    # path): copied back as one
    packed: torch.Tensor | None = None
    _host: list[torch.Tensor | None] | None = None
    _event: torch.cuda.Event | None = None

    def start_copy(self) -> None:
        """Non-blocking device->host copies of everything the host will read, and an event marking them done."""
        first = (self.sampled, self.verify_tokens) if self.packed is None else (self.packed,)
        tensors = (*first, self.input_ids, self.recall)
        # (a CPU tensor is cloned: `input_ids` may view a static buffer the next step overwrites)
        host = [None if t is None else t.to("cpu", non_blocking=True) if t.is_cuda else t.clone() for t in tensors]
        if self.packed is not None:
            n = self.sampled.shape[0]
            host[:1] = [host[0][:n], host[0][n:].view(self.verify_tokens.shape)]
        self._host = host
        if any(t is not None and t.is_cuda for t in tensors):
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()

    def lists(self) -> list[list[int]]:
        """Per entry of the plan: its sampled token ids (the format ``Scheduler.update`` takes). Waits for the copy."""
        if self._host is None:
            self.start_copy()
        if self._event is not None:
            self._event.synchronize()
        sampled, verify = self._host[:2]
        out: list[list[int]] = [[] for _ in self.plan.entries]
        if sampled is not None:
            for i, tok in zip(self.sample_rows, sampled.tolist()):
                out[i] = [tok]
        if verify is not None:
            for i, row in zip(self.verify_rows, verify.tolist()):
                out[i] = [t for t in row if t >= 0]
        return out

    def recall_lists(self) -> list[tuple[int, list[float]]]:
        """(entry index, recall per layer) of the scored verifications; after ``lists()`` (the copy is done)."""
        if self._host is None or self._host[3] is None:
            return []
        return list(zip(self.recall_rows, self._host[3].tolist()))

    def device_seconds(self) -> float | None:
        """Device time from ``start_event`` to the end of the result copies (after ``lists()``), when both exist."""
        if self.start_event is None or self._event is None:
            return None
        return self.start_event.elapsed_time(self._event) / 1e3

    def host_input_ids(self) -> list[int] | None:
        if self._host is None or self._host[2] is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        return self._host[2].tolist()
