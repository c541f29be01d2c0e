"""The per-step ForwardContext: how the runtime talks to every attention layer of the compiled graph.

The contract (plan once per step, run in every layer — FlashInfer's plan/run split):

* No context set (the default): ``torch.ops.sparsespec.attention`` computes exactly the attention the model
  would have computed (its own mask, scale, softcap), so ``compiled(x) == model(x)`` and HF ``generate`` work.
* Context set (``with forward_context(ctx): compiled(input_ids=..., position_ids=..., use_cache=False)``):
  the graph is run on a *flattened ragged batch* — ``input_ids[1, T]`` holding the new tokens of ``R``
  requests back to back. Each attention op

  1. writes the K/V of the ``T`` new tokens into ``kv.k[layer] / kv.v[layer]`` at ``slot_mapping``;
  2. attends every query token of request ``r`` causally over that request's context through its block table:
     full attention (prefill chunks, verify tokens, first draft cycle) or, for rows with ``is_sparse[r]``,
     PillarAttn — the request's pillar set for this layer and KV head plus every token at a position
     ``>= draft_start[r]`` (the last verified chunk and the tokens drafted since);
  3. for rows listed in ``score_rows`` (verify rows), ranks the context before the verify chunk (positions
     ``< seq_lens[r] - query_len[r]``, which is the next cycle's ``draft_start``) by the attention probability
     of the verify queries (averaged over the GQA group and the verify queries) and stores the
     top-``budget`` positions (the ``recent`` newest always among them) into
     ``pillars.indices[layer, score_slots[j]]`` (by default the request's own ``pillar_slot[r]``).

Positions are *logical* token positions inside a request (0 .. seq_len-1); ``block_tables`` maps them to pages.
All tensors live on the model's device; shapes are given with ``T`` = query tokens in the step (padding
included), ``R`` = requests in the step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class PagedKVCache:
    """One K and one V page pool per layer: ``k[layer]: [num_pages, page_size, num_kv_heads, head_dim]``.

    A token at logical position ``p`` of a request lives at ``slot = block_table[p // page_size] * page_size +
    p % page_size``; ``k[layer].view(-1, H_kv, D)[slot]`` is its key.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    page_size: int

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]


@dataclass
class PillarStore:
    """Selected pillar positions per (layer, request slot, KV head), refreshed at every verification.

    ``indices: [num_layers, max_slots, num_kv_heads, max_budget]`` int32 logical positions, the first
    ``lengths[slot]`` entries of each row valid (the same count for every layer and head of a slot), all
    ``< draft_start`` of that slot's current cycle, sorted ascending.
    """

    indices: torch.Tensor
    lengths: torch.Tensor  # [max_slots] int32
    # [num_layers, max_slots] fp32: each slot's draft recall at its last scored verification (the share of the verify
    # queries' attention inside the next draft's keys, kernels/hybrid.py draft_recall); None: not measured
    recall: torch.Tensor | None = None

    @property
    def max_budget(self) -> int:
        return self.indices.shape[-1]


@dataclass
class ForwardContext:
    """Step metadata, built once by the runtime and read by every attention layer."""

    kv: PagedKVCache
    slot_mapping: torch.Tensor  # [T] int64, -1 for padding tokens (their K/V are not written)
    query_start_loc: torch.Tensor  # [R + 1] int32, cumulative query-token counts
    seq_lens: torch.Tensor  # [R] int32, context length of each request *including* this step's tokens
    block_tables: torch.Tensor  # [R, max_pages_per_request] int32
    max_query_len: int  # host ints: kernel grids need them without a device sync
    max_seq_len: int
    # PillarAttn draft path
    is_sparse: torch.Tensor  # [R] bool: draft with pillars (else full attention)
    draft_start: torch.Tensor  # [R] int32: positions >= this are always attended (dense tail)
    pillar_slot: torch.Tensor  # [R] int64: row of the request in PillarStore
    pillars: PillarStore | None = None
    # Pillar refresh on verification rows
    score_rows: torch.Tensor | None = None  # [Rv] int64 indices into the R requests
    # [Rv] int64 PillarStore row each scored row is written to (None: ``pillar_slot[score_rows]``). Explicit so a
    # step padded for a CUDA graph can send its padding rows (budget 0) to a scratch row nobody reads.
    score_slots: torch.Tensor | None = None
    # [num_layers, Rv, Hkv, max_seq_len] fp32. When set, each layer only *scores* into its slice and the runtime
    # selects for every layer at once after the forward (``ops.select_step_pillars``): one launch of
    # num_layers * Rv * Hkv programs instead of num_layers launches of Rv * Hkv programs each (a bisection per
    # (row, head) is latency-bound: ~55 us per launch with Rv = 7 on the H200, bench/RESULTS.md). Exact: pillars
    # written in a step are only read by later steps, and a request appears once per step.
    layer_scores: torch.Tensor | None = None
    budget: torch.Tensor | None = None  # [Rv] int32 pillar count B to select for each scored row
    recent: int = 16  # newest tokens before draft_start always kept among the B pillars
    # None: PillarAttn's selection. Else the hybrid draft (sinks + recent window + pillars, kernels/hybrid.py): its
    # window share, "request" / "layer" (adapted per request / per request and layer from the scores) or a number
    draft_split: float | str | None = None
    # Per-layer semantics the graph alone cannot carry (from the model config at link time)
    sliding_windows: list[int] = field(default_factory=list)  # per layer, -1 = none
    # Which implementation the attention op dispatches to: "reference" (pure PyTorch) or "triton"
    impl: str = "reference"
    # The layer index of every attention op that read this context, in call order: lets the runtime check after
    # each forward that the graph it calls really was rewritten (each layer exactly once; a layer seen twice means
    # Dynamo split the model into graphs whose layer numbering could not be told apart).
    attention_layers: list[int] = field(default_factory=list)
    # The step's attention work plans (kernels.AttentionPlan), one per sliding window, built by the first layer that
    # needs one and read by every later layer (plan once per step, run in every layer).
    attention_plans: dict = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return self.seq_lens.shape[0]


_CURRENT: ForwardContext | None = None


def get_forward_context() -> ForwardContext | None:
    """The context of the step being run, or ``None`` outside the runtime."""
    return _CURRENT


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Set ``ctx`` for the duration of one forward of the compiled graph (not re-entrant)."""
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError("a sparsespec ForwardContext is already set: steps cannot be nested")
    _CURRENT = ctx
    try:
        yield ctx
    finally:
        _CURRENT = None
