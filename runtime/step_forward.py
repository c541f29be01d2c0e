"""One forward of the compiled model on a flattened ragged batch: what the eager step path and every CUDA-graph
capture run, so both build the ForwardContext the same way (``run_packed``, the one place it is built), call the
model the same way and check the rewrite."""

from __future__ import annotations

import torch

from sparsespec_compile.context import ForwardContext, PagedKVCache, PillarStore, forward_context
from sparsespec_compile.ops import select_step_pillars

from .padded_step import unpack_step
from .step_shapes import StepShape

_UNUSED_MASKS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def unused_attention_mask(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [1, 1, 1, 1] additive zero mask to pass as ``attention_mask``: HF takes a 4D mask as already prepared and
    builds none. Without it, the flattened batch's restarting position ids look like packed sequences, so every
    forward builds a T x T packed-causal mask that ``sparsespec::attention`` never reads (with a context set, masking
    comes from the request boundaries). In the H200 profile that mask was a cumsum kernel plus arithmetic fused into
    two per-layer RoPE kernels (0.25 ms of a 2.7 ms SmolLM2 step, together with the RoPE itself)."""
    key = (dtype, torch.device(device))
    if key not in _UNUSED_MASKS:
        _UNUSED_MASKS[key] = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)
    return _UNUSED_MASKS[key]


def check_layers_ran(layers: list[int], num_layers: int) -> None:
    """Each layer's sparsespec attention ran exactly once in this forward, or an error that says what went wrong."""
    if len(layers) != num_layers:
        raise RuntimeError(
            f"the compiled model ran {len(layers)} sparsespec attention op(s) for {num_layers} layers: it "
            "was not compiled with backend='sparsespec', or some attention was left alone "
            "(print(sparsespec_compile.inspect(model)) shows which and why), or Dynamo fell back to eager "
            "(TORCH_LOGS=recompiles,graph_breaks shows why)"
        )
    if sorted(layers) != list(range(num_layers)):
        twice = sorted({i for i in layers if layers.count(i) > 1})
        raise RuntimeError(
            f"the compiled model ran the attention of layer(s) {twice} more than once in one forward (layers in call "
            f"order: {layers[:8]}{'...' if len(layers) > 8 else ''}): Dynamo split the model into several graphs "
            "whose attention nodes the rewrite could not number (a graph break inside the decoder layers; "
            "TORCH_LOGS=graph_breaks shows where)"
        )


def call_model(compiled, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: torch.Tensor,
               dtype: torch.dtype):
    """The one call the runtime makes (steps, graph captures, LLM's construction probe): no HF cache; no attention
    weights or hidden states even if the model's config asks for them (``output_attentions=True`` would keep the
    softmax alive as an output, and the rewrite must leave such attention alone)."""
    # specialize_float (for the graphs compiled from this call only): once Dynamo has seen one model's attention
    # scale, a second model of the same class (another head_dim) would get its scale as a tensor input, which the
    # rewrite must leave alone; specialised, each scale is a constant, guarded like any other
    with torch._dynamo.config.patch(specialize_float=True):
        return compiled(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                        logits_to_keep=logits_to_keep, attention_mask=unused_attention_mask(dtype, input_ids.device),
                        output_attentions=False, output_hidden_states=False)


def run_compiled(compiled, ctx: ForwardContext, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 logits_indices: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Logits ``[N, V]`` of ``logits_indices``; selects the step's pillars after the forward (``ctx.layer_scores``)."""
    for t in (input_ids, position_ids):
        torch._dynamo.maybe_mark_dynamic(t, 1)  # T varies every step: one dynamic graph, not one per T
    torch._dynamo.maybe_mark_dynamic(logits_indices, 0)
    kv = ctx.kv.k[0]
    with forward_context(ctx), torch.inference_mode():
        out = call_model(compiled, input_ids, position_ids, logits_indices, kv.dtype)
        # Every step, not just the first: if Dynamo ever falls back to the original forward (recompile limit, a new
        # graph break), plain attention over the flattened batch would produce wrong tokens silently.
        check_layers_ran(ctx.attention_layers, num_layers)
        select_step_pillars(ctx)
    return out.logits[0]


def draft_split(config) -> float | str | None:
    """``ForwardContext.draft_split`` of a config: the hybrid draft's window share, None for PillarAttn's selection."""
    return config.hybrid_split if config.draft == "hybrid" else None


def run_packed(compiled, packed: torch.Tensor, shape: StepShape, *, kv: PagedKVCache, pillars: PillarStore | None,
               recent: int, sliding_windows: list[int], impl: str, num_layers: int,
               split: float | str | None = None) -> torch.Tensor:
    """Logits ``[shape.num_logits, V]`` of the step packed in ``packed`` (padded_step.py) on the device; ``split``:
    :func:`draft_split`."""
    t = unpack_step(packed, shape)
    if not (shape.sparse or shape.scored):
        pillars = None  # every row full, nothing scored: the kernels' full-row variants (see StepShape.sparse)
    ctx = ForwardContext(
        kv=kv, slot_mapping=t.slot_mapping, query_start_loc=t.query_start_loc, seq_lens=t.seq_lens,
        block_tables=t.block_tables, max_query_len=shape.max_query_len, max_seq_len=shape.max_seq_len,
        is_sparse=t.is_sparse, draft_start=t.draft_start, pillar_slot=t.pillar_slot, pillars=pillars,
        score_rows=t.score_rows, score_slots=t.score_slots, budget=t.budget, recent=recent, draft_split=split,
        sliding_windows=sliding_windows, impl=impl,
        layer_scores=step_score_buffer(pillars, num_layers, shape.scored, kv, shape.max_seq_len),
    )
    return run_compiled(compiled, ctx, t.input_ids, t.position_ids, t.logits_indices, num_layers)


def step_score_buffer(pillars: PillarStore | None, num_layers: int, num_scored: int, kv: PagedKVCache,
                      max_ctx: int) -> torch.Tensor | None:
    """``ForwardContext.layer_scores`` for a step that scores ``num_scored`` rows (None when it scores none)."""
    if pillars is None or num_scored == 0:
        return None
    kv_heads = kv.k[0].shape[2]
    return torch.empty(num_layers, num_scored, kv_heads, max_ctx, dtype=torch.float32, device=kv.k[0].device)
