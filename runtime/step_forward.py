"""One forward of the compiled model on a flattened ragged batch: what the eager step path and every CUDA-graph
capture run, so both call the model the same way and both check the rewrite."""

from __future__ import annotations

import torch

from sparsespec_compile.context import ForwardContext, forward_context
from sparsespec_compile.ops import select_step_pillars

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


def run_compiled(compiled, ctx: ForwardContext, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 logits_indices: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Logits ``[N, V]`` of ``logits_indices``; selects the step's pillars after the forward (``ctx.layer_scores``)."""
    for t in (input_ids, position_ids):
        torch._dynamo.maybe_mark_dynamic(t, 1)  # T varies every step: one dynamic graph, not one per T
    torch._dynamo.maybe_mark_dynamic(logits_indices, 0)
    kv = ctx.kv.k[0]
    with forward_context(ctx), torch.inference_mode():
        out = compiled(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=logits_indices,
                       attention_mask=unused_attention_mask(kv.dtype, kv.device))
        # Every step, not just the first: if Dynamo ever falls back to the original forward (recompile limit, a new
        # graph break), plain attention over the flattened batch would produce wrong tokens silently.
        if ctx.attention_calls != num_layers:
            raise RuntimeError(
                f"the compiled model ran {ctx.attention_calls} sparsespec attention op(s) for {num_layers} layers: it "
                "was not compiled with backend='sparsespec', or some attention was left alone "
                "(print(sparsespec_compile.inspect(model)) shows which and why), or Dynamo fell back to eager "
                "(TORCH_LOGS=recompiles shows why)"
            )
        select_step_pillars(ctx)
    return out.logits[0]
