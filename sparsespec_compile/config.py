"""SparseSpecConfig: every knob of the backend and the runtime, validated once."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

_DRAFTS = ("pillar", "streaming", "hybrid", "full")
_SPLITS = ("request", "layer")  # the hybrid draft's adaptive window share: one per request, or per request and layer
_COMPILERS = ("inductor", "eager")
_IMPLS = ("auto", "reference", "triton")
_GRAPHS = ("auto", "on", "off", "pad")


_RECENT = 16  # default newest tokens kept among the pillars (capped by min_budget)
_INT, _NUM = (int,), (int, float)
_TYPES = {  # what each field must be (bool is an int to Python: refused for these)
    "stride": _INT, "sparsity": _NUM, "min_budget": _INT, "max_budget": _INT, "recent": _INT, "draft": (str,),
    "page_size": _INT, "kv_memory_fraction": _NUM, "num_pages": _INT, "max_num_seqs": _INT,
    "max_num_batched_tokens": _INT, "compiler": (str,), "attention_impl": (str,), "offload": (bool,),
    "host_kv_pages": _INT, "offload_chunk_pages": _INT, "kv_oversubscription": _NUM, "cuda_graphs": (str,), "hybrid_split": (str, int, float),
    "log_stats_interval": _NUM,
}
_OPTIONAL = {"recent", "num_pages", "host_kv_pages", "kv_oversubscription", "log_stats_interval"}


@dataclass(frozen=True)
class SparseSpecConfig:
    """Knobs of ``torch.compile(model, backend="sparsespec", options={...})`` and of ``LLM``.

    stride: draft tokens per speculative cycle (k); 0 = plain decoding on the same runtime (the baseline). With
        ``adaptive`` it is the maximum: each request picks its own k in 0..stride at every cycle.
    adaptive: per-request adaptive stride (runtime/stride_policy.py): at each cycle start a request drafts the k that
        maximises its expected tokens per unit of measured step cost, from its own decayed per-position acceptance;
        k = 0 is plain decoding in the same step, and such a request re-probes now and then. False: a fixed k.
    sparsity: fraction s of the verified context kept as pillars (B = max(min_budget, ceil(s * L))).
    min_budget / max_budget: bounds on B (paper: 128 and 6,144).
    recent: newest verified tokens always among the pillars (None: min(16, min_budget)).
    draft: "pillar" (PillarAttn), "streaming" (sinks + recent window, MagicDec-like, same budget), "hybrid" (sinks +
        recent window + pillars at the same budget, split by where the verify queries' attention fell:
        kernels/hybrid.py) or "full" (full-attention draft: the upper bound on acceptance).
    hybrid_split: the hybrid draft's window share of the budget: "request" (adapted per request at each verification
        from its attention mass over all layers), "layer" (per request and layer), or a fixed number in [0, 1]
        (0 = exactly the pillar draft, 1 = exactly the streaming draft). Ignored by the other drafts.
    page_size: tokens per KV page.
    kv_memory_fraction: share of free device memory given to the KV pool (ignored when num_pages is set).
    num_pages: explicit KV pool size in pages (tests, oversubscription experiments).
    max_num_seqs / max_num_batched_tokens: requests and tokens per step.
    compiler: "inductor" (default) or "eager" (run the rewritten graph without Inductor).
    fuse_projections: concatenate the weights of linear layers that read one input (q/k/v, gate/up) so each group
        is one GEMM (passes/fuse_projections.py): 7 -> 4 GEMM launches per Llama layer. Measured on the H200: the
        SmolLM2-shaped decode step 13 % faster at stride 0 and 4.5 % at k = 8 (bench/RESULTS.md). Off by default
        because it costs a second copy of those weights (a Qwen3-8B's q/k/v and gate/up: ~9 GB). Weights changed
        after the compile are seen: each call, and each LLM.generate, refreshes the copies in place.
    attention_impl: "auto" (Triton on GPU, PyTorch reference on CPU), "reference" or "triton".
    overlap: host/device overlap: the engine launches step i + 1 before reading step i's results. With delayed
        verification (stride > 0) a request that verified (or ended its prompt) at step i sits out step i + 1, and
        drafts sampled at step i enter step i + 1 as placeholders patched on the device (k + 2 steps per cycle
        instead of k + 1). At stride 0 a plain decode's token enters the next step as such a placeholder and its
        stop checks run one step late (a stopped request has one extra step computed and dropped).
        None (default): on for a single-GPU CUDA engine, off on the CPU and under tensor parallelism. Measured on
        the H200 (bench/RESULTS.md): k = 8 at B 64 went from 8.0% to 0.8% GPU idle and 1.40x the tokens/s; at
        stride 0, where the synchronous engine left the GPU 17% idle, it is not yet measured.
    offload: under KV page pressure, offload whole requests to a host pool and restore them later (no recompute);
        False: recompute preemption (drop the KV, re-prefill later).
    host_kv_pages: host pool size in pages (None: as many as the device pool, at most a quarter of free host
        memory). When it is full, eviction falls back to recompute preemption (logged, counted per request).
    offload_chunk_pages: pages per copy when offloading or restoring (paper: 1,024 tokens = 64 pages of 16).
    cuda_graphs: decode steps (no prefill chunk) run padded to a bucketed static shape and replayed as one CUDA
        graph per shape: "auto" (on when the model is on a CUDA device), "on", "off", or "pad" (the padded
        static-shape path without capture: what the CPU tests run to prove padding exact).
    kv_oversubscription: admit a request only while the running requests' worst-case KV (prompt + max_tokens)
        stays within this multiple of the device pool (1.0 = guaranteed capacity, never offloads); None: admit as
        soon as the prompt fits in the free pages (aggressive, the default: output lengths are unknown).
    log_stats_interval: seconds between one-line progress logs of the step loop (logger ``sparsespec.runtime``,
        INFO: tokens/s, queue, the k chosen, GPU busy share, host time per stage, graphs captured; stats_log.py);
        None (default): no log.
    """

    stride: int = 8
    adaptive: bool = True
    sparsity: float = 0.05
    min_budget: int = 128
    max_budget: int = 6144
    recent: int | None = None
    draft: str = "pillar"  # the default draft; "hybrid" becomes it if it wins on the GPU (bench/RESULTS.md)
    hybrid_split: str | float = "request"
    page_size: int = 16
    kv_memory_fraction: float = 0.5
    num_pages: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    compiler: str = "inductor"
    fuse_projections: bool = False
    attention_impl: str = "auto"
    overlap: bool | None = None
    offload: bool = True
    host_kv_pages: int | None = None
    offload_chunk_pages: int = 64
    kv_oversubscription: float | None = None
    cuda_graphs: str = "auto"
    log_stats_interval: float | None = None

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"SparseSpecConfig.{name}={getattr(self, name)!r}: {why}")

        # Types first: a string "0.1" would otherwise fail as a raw comparison error deep in the range checks.
        for name, kinds in _TYPES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                what = " or ".join(k.__name__ for k in kinds) + (" or None" if name in _OPTIONAL else "")
                fail(name, f"must be {what}, got {type(value).__name__}")
        if self.recent is None:  # derived from min_budget, so setting only min_budget never blames `recent`
            object.__setattr__(self, "recent", min(_RECENT, self.min_budget))
        if not isinstance(self.stride, int) or self.stride < 0:
            fail("stride", "must be an int >= 0 (0 = plain decoding; the paper uses 8)")
        if self.adaptive not in (True, False):
            fail("adaptive", "must be True (per-request stride in 0..stride) or False (a fixed stride)")
        if not (0.0 < self.sparsity <= 1.0):
            fail("sparsity", "must be in (0, 1] (the fraction of context kept as pillars; paper: 0.05)")
        if self.min_budget < 1:
            fail("min_budget", "must be >= 1")
        if self.max_budget < self.min_budget:
            fail("max_budget", f"must be >= min_budget ({self.min_budget})")
        if not (0 <= self.recent <= self.min_budget):
            fail("recent", f"must be in [0, min_budget={self.min_budget}]")
        if self.draft not in _DRAFTS:
            fail("draft", f"must be one of {_DRAFTS}")
        if isinstance(self.hybrid_split, str) and self.hybrid_split not in _SPLITS or \
                not isinstance(self.hybrid_split, str) and not 0.0 <= self.hybrid_split <= 1.0:
            fail("hybrid_split", f"must be one of {_SPLITS} (adaptive) or a window share in [0, 1]")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            fail("page_size", "must be a power of two >= 1")
        if not (0.0 < self.kv_memory_fraction < 1.0):
            fail("kv_memory_fraction", "must be in (0, 1)")
        if self.num_pages is not None and self.num_pages < 1:
            fail("num_pages", "must be >= 1 or None (size from memory)")
        if self.max_num_seqs < 1:
            fail("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens < self.stride + 1:
            fail("max_num_batched_tokens", f"must be >= stride + 1 = {self.stride + 1} (one verify chunk)")
        if self.compiler not in _COMPILERS:
            fail("compiler", f"must be one of {_COMPILERS}")
        if self.attention_impl not in _IMPLS:
            fail("attention_impl", f"must be one of {_IMPLS}")
        if self.overlap not in (None, True, False):
            fail("overlap", "must be None (auto: on for one CUDA device), True or False")
        if self.fuse_projections not in (True, False):
            fail("fuse_projections", "must be True or False")
        if self.cuda_graphs not in _GRAPHS:
            fail("cuda_graphs", f"must be one of {_GRAPHS}")
        if self.host_kv_pages is not None and (not isinstance(self.host_kv_pages, int) or self.host_kv_pages < 1):
            fail("host_kv_pages", "must be an int >= 1 or None (as many as the device pool); offload=False disables")
        if not isinstance(self.offload_chunk_pages, int) or self.offload_chunk_pages < 1:
            fail("offload_chunk_pages", "must be an int >= 1")
        if self.kv_oversubscription is not None and not self.kv_oversubscription > 0:
            fail("kv_oversubscription", "must be > 0 (1.0 = guaranteed capacity) or None (admit aggressively)")
        if self.log_stats_interval is not None and not self.log_stats_interval > 0:
            fail("log_stats_interval", "must be > 0 seconds, or None (no progress log)")

    def budget(self, context_len: int) -> int:
        """Pillar count B for a verified context of ``context_len`` tokens (never more than the context)."""
        b = max(self.min_budget, math.ceil(self.sparsity * context_len))
        return min(b, self.max_budget, context_len)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | SparseSpecConfig | None) -> SparseSpecConfig:
        """Build from ``torch.compile(..., options=...)``; unknown keys are an error naming the valid ones."""
        if options is None:
            return cls()
        if isinstance(options, SparseSpecConfig):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"sparsespec options must be a dict or SparseSpecConfig, got {type(options).__name__}")
        return cls(**options)


_dataclass_init = SparseSpecConfig.__init__


@functools.wraps(_dataclass_init)
def _checked_init(self, *args, **kwargs) -> None:
    """Unknown keywords are an error that lists the valid options (the dataclass's own is a bare TypeError)."""
    unknown = sorted(set(kwargs) - set(SparseSpecConfig.fields()))
    if unknown:
        raise ValueError(f"unknown sparsespec option(s) {unknown}; valid options are: "
                         f"{', '.join(sorted(SparseSpecConfig.fields()))}")
    _dataclass_init(self, *args, **kwargs)


SparseSpecConfig.__init__ = _checked_init
