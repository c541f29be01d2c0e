"""``sparsespec_compile.inspect(model, input_ids)``: what the backend does to a model, without running it twice."""

from __future__ import annotations

import torch

from .backend import capture_reports, sparsespec_backend
from .passes import RewriteReport


def inspect(model: torch.nn.Module, input_ids: torch.Tensor | None = None, **forward_kwargs) -> RewriteReport:
    """Compile ``model`` with the sparsespec backend (eager, no Inductor), run it once, return the report.

    Raises ValueError for a model that has no attention the backend could find.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"inspect() takes a torch.nn.Module, got {type(model).__name__}")
    if input_ids is None:
        device = next(model.parameters()).device
        input_ids = torch.arange(1, 9, device=device).unsqueeze(0)
    torch._dynamo.reset()  # a fresh trace, so the report covers every graph
    compiled = torch.compile(model, backend=lambda gm, ex: sparsespec_backend(gm, ex, options={"compiler": "eager"}))
    with capture_reports() as reports, torch.no_grad():
        compiled(input_ids, **forward_kwargs)
    torch._dynamo.reset()
    report = RewriteReport()
    for r in reports:
        report.merge(r)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):
        report.notes.append("encoder-decoder model: the speculative runtime serves causal decoder-only models only")
    elif cfg is not None and not getattr(cfg, "is_decoder", True) and "ForCausalLM" not in type(model).__name__:
        report.notes.append("not a causal LM: the rewrite keeps its semantics, but LLM() cannot serve it")
    if not report.records:
        raise ValueError(
            f"{type(model).__name__}: no attention found in the traced graph(s) "
            "(no scaled_dot_product_attention call and no softmax); nothing for sparsespec to rewrite"
        )
    return report
