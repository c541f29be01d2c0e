"""Can ``LLM`` serve this model exactly? Checked once, at construction, so a model the runtime would serve wrongly
(or fail on per request, deep inside the step loop) is refused with an error that says why and what to do.

The runtime computes causal attention over a paged KV cache, reads ``.logits``, and relies on every attention layer
running as ``sparsespec::attention``. So it refuses: encoder-decoders, models without an LM head, models whose
attention is not causal (probed: changing the last token must not change earlier positions' logits), and compiled
models in which some attention did not become the op (another backend, or a layer the rewrite left alone). The
compiled probe runs the runtime's own call (flattened batch, ``logits_to_keep``) without a ForwardContext, so the
graph it compiles is the one the first steps reuse; it also records the K/V shape each layer's op receives, which
sizes the KV pool (a model that repeats K/V to the query heads itself, in a form the pass does not undo, hands the
op ``num_attention_heads`` K/V heads, not the config's ``num_key_value_heads``).
"""

from __future__ import annotations

import logging

import torch

from sparsespec_compile.backend import capture_reports, sparsespec_backend
from sparsespec_compile.ops import record_attention_calls

from .step_forward import call_model, check_layers_ran

log = logging.getLogger("sparsespec.runtime")

PROBE_LEN = 8  # tokens of the probes: short, > 1 (Dynamo specialises sizes 0 and 1)
# Largest |logit change| at positions before the changed token that still counts as causal, per dtype: rounding only
_CAUSAL_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}


def check_model(model: torch.nn.Module) -> None:
    """Refuse (ValueError) a model the runtime cannot serve exactly, before anything is compiled."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"LLM() takes a Hugging Face causal LM (a model with .config); {name} has none")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model: sparsespec serves causal decoder-only LMs "
                         "(AutoModelForCausalLM)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{name} has no LM head (get_output_embeddings() is None), so no logits to sample from: "
                         f"load it with AutoModelForCausalLM, not AutoModel")
    _check_causal(model)


def _probe_ids(model: torch.nn.Module) -> torch.Tensor:
    vocab = int(model.config.get_text_config().vocab_size)
    device = next(model.parameters()).device
    return (torch.arange(PROBE_LEN, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)  # [1, PROBE_LEN]


def _check_causal(model: torch.nn.Module) -> None:
    """Position i's logits must not depend on tokens after i: change the last token, compare the others."""
    ids = _probe_ids(model)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1).remainder(int(model.config.get_text_config().vocab_size))
    with torch.inference_mode():
        a, b = (model(input_ids=x, use_cache=False, output_attentions=False, output_hidden_states=False)
                .logits[0, :-1].float() for x in (ids, changed))
    diff = (a - b).abs().max().item()
    dtype = next(model.parameters()).dtype
    tol = _CAUSAL_TOL.get(dtype, 5e-2) * max(1.0, a.abs().max().item())
    if not diff <= tol:
        raise ValueError(
            f"{type(model).__name__} does not attend causally: changing the last of {PROBE_LEN} tokens changed the "
            f"logits of earlier positions by up to {diff:.3g} (bidirectional attention, e.g. an encoder or a "
            f"config with is_decoder=False). sparsespec generates with causal attention and would produce tokens "
            f"that differ from the model's; serve a causal decoder-only LM")


def probe_compiled(compiled, model: torch.nn.Module, num_layers: int) -> tuple[int, int]:
    """Run the compiled model once as the runtime calls it; check every layer's attention ran as the op.

    Returns ``(kv_heads, head_dim)`` the op receives (what the KV pool must hold per layer)."""
    ids = _probe_ids(model)
    positions = torch.arange(PROBE_LEN, device=ids.device).unsqueeze(0)
    keep = positions[0, -2:].clone()  # two logit rows, as a step has at least (step_shapes.exact_shape pads to two)
    for t in (ids, positions):
        torch._dynamo.maybe_mark_dynamic(t, 1)  # as run_compiled does: the graph compiled here is the runtime's
    torch._dynamo.maybe_mark_dynamic(keep, 0)
    dtype = next(model.parameters()).dtype
    try:
        with capture_reports() as reports, record_attention_calls() as calls, torch.inference_mode():
            out = call_model(compiled, ids, positions, keep, dtype)
    except Exception as exc:
        raise ValueError(f"the compiled {type(model).__name__} failed on the call the runtime makes (input_ids, "
                         f"position_ids, use_cache=False, logits_to_keep, a 4D attention_mask): "
                         f"{type(exc).__name__}: {exc}") from exc
    if getattr(out, "logits", None) is None:
        raise ValueError(f"the compiled {type(model).__name__} returns {type(out).__name__} without .logits: "
                         "sparsespec serves causal LMs with an LM head")
    layers = sorted(c.layer_idx for c in calls)
    left = sorted({r.reason for rep in reports for r in rep.left_alone})  # empty unless this call compiled a graph
    if not calls and not reports:
        backend = _backend_of(compiled)
        if backend is sparsespec_backend:  # a graph compiled earlier in this process, reused: it left them alone
            raise ValueError(
                f"none of the {num_layers} attention layers ran as sparsespec::attention in the graph Dynamo reused "
                "(compiled earlier in this process): the rewrite left them alone. "
                "print(sparsespec_compile.inspect(model)) shows why")
        name = getattr(backend, "__name__", None)
        raise ValueError(
            f"none of the {num_layers} attention layers ran as sparsespec::attention: the model was compiled with "
            f"another backend{f' ({name!r})' if name else ''}. Pass the model itself, or "
            "torch.compile(model, backend='sparsespec')")
    if len(calls) == num_layers and layers != list(range(num_layers)):
        try:  # the step loop's own check: it names the layers that ran twice and why
            check_layers_ran([c.layer_idx for c in calls], num_layers)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
    if layers != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(layers))
        raise ValueError(
            f"{len(calls)} of {num_layers} attention layers ran as sparsespec::attention (layers {missing} did not): "
            f"the rewrite left some attention alone{f' ({left})' if left else ''}, so the runtime would attend "
            "wrongly there. print(sparsespec_compile.inspect(model)) shows which and why")
    shapes = sorted({(c.kv_heads, c.head_dim) for c in calls})
    if len(shapes) != 1:
        raise ValueError(f"the attention layers receive K/V of different shapes (heads, head_dim) {shapes}: the "
                         "paged KV pool holds one shape for every layer")
    return shapes[0]


def _backend_of(compiled):
    """The compiler function of a ``torch.compile``-d module, if Dynamo's wrapper shows it (private attributes,
    read only to word an error message; None when they are not there)."""
    inner = getattr(getattr(getattr(compiled, "dynamo_ctx", None), "callback", None), "_torchdynamo_orig_backend", None)
    backend = getattr(inner, "_torchdynamo_orig_backend", None)
    fn = getattr(backend, "compiler_fn", backend)
    return getattr(fn, "func", fn)  # functools.partial (options=...)


__all__ = ["check_model", "probe_compiled"]
