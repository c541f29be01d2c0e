"""Names every part of the benchmark shares: the methods, output file names, and device housekeeping."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

# sparsespec = the default config (PillarAttn drafts, per-request adaptive stride up to --stride); pillar and
# streaming draft a fixed --stride every cycle
METHODS = ("hf_eager", "hf_static_compile", "stride0", "sparsespec", "pillar", "streaming", "hybrid")
HF_METHODS = ("hf_eager", "hf_static_compile")
SPEC_METHODS = ("sparsespec", "pillar", "streaming", "hybrid")
DRAFT_OF = {"stride0": "pillar", "sparsespec": "pillar", "pillar": "pillar", "streaming": "streaming",
            "hybrid": "hybrid"}  # stride0: none
DEFAULT_PROMPTS = Path("../shared/data/prompts/gsm8k_test.jsonl")
JSON_NAME, PNG_NAME = "e2e.json", "e2e.png"
# Counters of llm.stats() that accumulate over the LLM's life: the timed run's share is after - before.
COUNTERS = ("steps", "cycles", "output_tokens", "forward_tokens", "seconds", "gpu_busy_seconds", "graph_steps",
            "kv_tokens_read", "capture_seconds", "graph_seconds", "graph_kv_tokens_read", "all_cycles", "recall_verifies",
            "schedule_seconds", "launch_seconds", "resolve_seconds", "wait_seconds", "request_steps")
LIST_COUNTERS = ("cycles_by_k", "position_drafted", "position_accepted", "recall_sum_by_layer")  # element by element


def log_runtime_to_stderr() -> None:
    """The runtime's INFO lines (the progress log, graphs captured) on stderr, timestamped."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    runtime_log = logging.getLogger("sparsespec.runtime")
    runtime_log.addHandler(handler)
    runtime_log.setLevel(logging.INFO)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_count() -> int:
    """Dynamo graphs compiled so far: a compile inside the timed run (a shape the warm-up missed) shows here."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def clear(device: torch.device) -> None:
    torch._dynamo.reset()  # every cell compiles afresh: no graph or guard of an earlier cell is reused
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
