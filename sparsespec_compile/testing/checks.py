"""``tiny_model`` and ``check_rewrite``: prove that the sparsespec rewrite did not change a model.

``check_rewrite`` compiles the model with the backend, asserts that every attention layer became a
``sparsespec::attention`` node, and that the logits equal the uncompiled model's within a tolerance keyed by
dtype. A failure is an AssertionError that names what diverged: the missing layers (with the passes' reasons),
or the batch row / position / vocab entry of the largest logit difference and the first decoder layer whose
hidden state diverged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import transformers

from ..backend import capture_reports
from ..passes import RewriteReport
from .families import FAMILIES

# (atol, rtol) on logits, keyed by the model's dtype. fp32: eager-compiled graphs are bitwise equal and Inductor
# differs by ~1e-7 on the tiny models (measured), so 1e-4 leaves room for real models yet catches any
# semantic slip (a dropped scale or mask moves logits by O(0.1..1) with tiny_model's weights).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for logits of a model in ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for {dtype}; known: {list(TOLERANCES)} (pass atol=/rtol=)") from None


def tiny_model(config: transformers.PretrainedConfig, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A random-weight fp32 causal LM in eval mode, built from ``config`` with ``attn_implementation=attn``.

    Weights are redrawn so activations are O(1) (HF's std-0.02 init gives nearly uniform attention, under which
    a wrong scale or a dropped mask barely moves the logits): linear weights ~ N(0, 1/fan_in), embeddings
    ~ N(0, 1), norm weights and biases ~ small noise around their defaults.
    """
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            owner = _owner(model, name)
            if isinstance(owner, torch.nn.Embedding):
                p.copy_(noise)
            elif p.ndim >= 2:
                fan_in = p.shape[0] if type(owner).__name__ == "Conv1D" else p.shape[-1]  # GPT-2's Conv1D is [in, out]
                p.copy_(noise / math.sqrt(fan_in))
            else:  # norms (weight 1 or 0 for Gemma's 1 + w) and biases: keep the default, add a little noise
                p.add_(0.1 * noise)
    return model.eval()


def smallest_llama(seed: int = 0) -> torch.nn.Module:
    """A one-layer random Llama (2 heads of 8): for runs that count steps or host work, where the model's arithmetic
    only has to be cheap (bench/oversubscription_steps.py, bench/host_ops_per_step.py)."""
    return tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1, head_dim=8), attn="sdpa", seed=seed)


def _owner(model: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model


def default_inputs(config: transformers.PretrainedConfig, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two deterministic cases: a left-padded batch of 2 x 7 (mask tensor) and an unpadded 1 x 5 (no mask)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = config.vocab_size
    ids = torch.randint(3, vocab, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    ids[0, :3] = getattr(config, "pad_token_id", None) or 0
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": torch.randint(3, vocab, (1, 5), generator=gen)}]


@dataclass
class RewriteCheck:
    """What ``check_rewrite`` established (it raises before returning if anything failed)."""

    report: RewriteReport  # merged over every graph Dynamo compiled, for every case
    num_layers: int
    rewritten_layers: list[int]  # sorted layer indices of the sparsespec::attention nodes of the last case
    max_abs_diff: float  # over every case, at valid (unpadded) positions
    atol: float
    rtol: float
    compiler: str
    num_cases: int
    left_alone: list[str] = field(default_factory=list)  # "node: reason"

    @property
    def all_layers_rewritten(self) -> bool:
        return self.rewritten_layers == list(range(self.num_layers))

    def __str__(self) -> str:
        return (
            f"check_rewrite[{self.compiler}]: {len(self.rewritten_layers)}/{self.num_layers} layers rewritten, "
            f"{self.num_cases} case(s), max |logit diff| {self.max_abs_diff:.3g} "
            f"(atol {self.atol:g}, rtol {self.rtol:g})"
        )


def check_rewrite(
    model: torch.nn.Module,
    inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    compiler: str = "eager",
    atol: float | None = None,
    rtol: float | None = None,
    fullgraph: bool = False,
    expect_rewritten: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> RewriteCheck:
    """Compile ``model`` with ``backend="sparsespec"`` and assert the rewrite is complete and lossless.

    inputs: forward kwargs (``input_ids``, ``attention_mask``, ...), a list of them, or ``None`` for
        ``default_inputs(model.config)``. Each case is traced afresh (``torch._dynamo.reset()`` before and after).
    compiler: ``"eager"`` (run the rewritten graph as is: fp32 results are bitwise equal) or ``"inductor"``.
    expect_rewritten: how many attention nodes must be rewritten per forward (default: ``num_hidden_layers``,
        and then their layer indices must be exactly 0..L-1).
    Raises AssertionError naming the missing layers or the diverging layer / position / max diff.
    """
    if compiler not in ("eager", "inductor"):
        raise ValueError(f"compiler must be 'eager' or 'inductor', got {compiler!r}")
    config = getattr(model, "config", None)
    if inputs is None:
        if config is None:
            raise ValueError("check_rewrite needs inputs= for a model without a transformers config")
        cases = default_inputs(config)
    else:
        cases = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    dtype = next(model.parameters()).dtype
    d_atol, d_rtol = tolerance(dtype) if atol is None or rtol is None else (atol, rtol)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    num_layers = config.num_hidden_layers if config is not None else None
    expected = num_layers if expect_rewritten is None else expect_rewritten
    if expected is None:
        raise ValueError("check_rewrite needs expect_rewritten= for a model without config.num_hidden_layers")

    merged, worst, layers = RewriteReport(), 0.0, []
    for i, case in enumerate(cases):
        with torch.no_grad():
            ref = _logits(model(**case))
        out, reports = _compiled_forward(model, case, compiler, fullgraph, options)
        for r in reports:
            merged.merge(r)
        layers = sorted(rec.layer_idx for r in reports for rec in r.rewritten)
        left = [f"{rec.node}: {rec.reason}" for r in reports for rec in r.left_alone]
        if len(layers) != expected or (expect_rewritten is None and layers != list(range(expected))):
            missing = sorted(set(range(num_layers or 0)) - set(layers))
            raise AssertionError(
                f"case {i}: {len(layers)} attention node(s) rewritten, expected {expected} "
                f"(layers rewritten {layers}; missing {missing}); left alone: {left or 'nothing'}; "
                f"graphs compiled: {len(reports)}"
            )
        worst = max(worst, _compare(model, case, ref, out, atol, rtol, compiler, options, i))
    return RewriteCheck(
        report=merged,
        num_layers=num_layers if num_layers is not None else expected,
        rewritten_layers=layers,
        max_abs_diff=worst,
        atol=atol,
        rtol=rtol,
        compiler=compiler,
        num_cases=len(cases),
        left_alone=[f"{rec.node}: {rec.reason}" for rec in merged.left_alone],
    )


def _compiled_forward(model, case, compiler, fullgraph, options, **extra):
    opts = {**(options or {}), "compiler": compiler}
    torch._dynamo.reset()  # a fresh trace: the report must describe this model, not a cached graph
    try:
        compiled = torch.compile(model, backend="sparsespec", options=opts, fullgraph=fullgraph, dynamic=False)
        with capture_reports() as reports, torch.no_grad():
            out = compiled(**case, **extra)
    finally:
        torch._dynamo.reset()
    return out, reports


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    return logits


def _valid(case: Mapping[str, Any], like: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: positions whose logits are compared (padded query rows have no defined output)."""
    mask = case.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape != like.shape[:2]:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.bool()


def _compare(model, case, ref, out, atol, rtol, compiler, options, index) -> float:
    out = _logits(out)
    if out.shape != ref.shape:
        raise AssertionError(f"case {index}: compiled output shape {tuple(out.shape)} != eager {tuple(ref.shape)}")
    valid = _valid(case, ref)
    ref_v, out_v = ref.float(), out.float()
    diff = (out_v - ref_v).abs()
    diff = torch.where(torch.isnan(out_v) & torch.isnan(ref_v), torch.zeros_like(diff), diff).nan_to_num(math.inf)
    excess = (diff - (atol + rtol * ref_v.abs())).masked_fill(~valid[..., None], -math.inf)
    max_diff = diff.masked_fill(~valid[..., None], 0).max().item() if diff.numel() else 0.0
    if excess.numel() == 0 or excess.max().item() <= 0:
        return max_diff
    b, s, v = (int(x) for x in torch.unravel_index(excess.argmax(), excess.shape))
    where = _first_diverging_layer(model, case, atol, rtol, compiler, options)
    raise AssertionError(
        f"case {index}: compiled logits differ from eager: max |diff| {max_diff:.4g} (atol {atol:g}, rtol {rtol:g}); "
        f"worst at batch {b}, position {s}, vocab {v}: compiled {out_v[b, s, v].item():.6g} vs eager "
        f"{ref_v[b, s, v].item():.6g}; {where}; input_ids shape {_shape_of(case)}"
    )


def _shape_of(case: Mapping[str, Any]) -> str:
    ids = case.get("input_ids")
    return str(tuple(ids.shape)) if isinstance(ids, torch.Tensor) else "?"


def _first_diverging_layer(model, case, atol, rtol, compiler, options) -> str:
    """Re-run both with ``output_hidden_states=True``: the first layer whose output differs is where it broke."""
    try:
        with torch.no_grad():
            ref = model(**case, output_hidden_states=True).hidden_states
        out, _ = _compiled_forward(model, case, compiler, False, options, output_hidden_states=True)
        out = out.hidden_states
    except Exception as exc:  # diagnostics only: never hide the real failure behind this one
        return f"first diverging layer unknown ({type(exc).__name__}: {exc})"
    if ref is None or out is None or len(ref) != len(out):
        return "first diverging layer unknown (no hidden states)"
    valid = _valid(case, ref[0])[..., None]
    for i, (r, o) in enumerate(zip(ref[1:], out[1:])):  # hidden_states[0] is the embedding output
        d = ((o.float() - r.float()).abs() - (atol + rtol * r.float().abs())).masked_fill(~valid, -math.inf)
        if d.max().item() > 0:
            b, s, _ = (int(x) for x in torch.unravel_index(d.argmax(), d.shape))
            md = (o.float() - r.float()).abs().masked_fill(~valid, 0).max().item()
            return f"first diverging layer: {i} (hidden-state max |diff| {md:.4g}, worst at batch {b}, position {s})"
    return "no decoder layer's hidden state diverged (the difference is after the last layer)"
