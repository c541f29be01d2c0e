"""FuseProjectionsPass (``fuse_projections=True``): linear layers that read one input with parameter weights (q/k/v,
gate/up) become one GEMM and a split. Nothing the model computes changes: greedy output equals HF greedy token for
token (fp32, CPU), through the runtime's padded steps, with Dynamo's graph and with Inductor's."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.backend import capture_reports
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model
from sparsespec_compile.testing.lossless import hf_greedy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]


def _model(family, layers=2):
    fam = FAMILIES[family]
    return tiny_model(fam.config(layers=layers, heads=4, kv_heads=2 if fam.gqa else 4, head_dim=8), attn="sdpa",
                      seed=0)


# groups fused per layer: q/k/v and gate/up; qwen2's q/k/v carry biases; phi3 already has fused qkv_proj and
# gate_up_proj (nothing left to fuse)
@pytest.mark.parametrize("family,compiler,per_layer", [("llama", "eager", 2), ("qwen2", "eager", 2),
                                                       ("qwen3", "eager", 2), ("gemma3", "eager", 2),
                                                       ("phi3", "eager", 0), ("llama", "inductor", 2)])
def test_fused_projections_equal_hf_greedy(family, compiler, per_layer):
    model = _model(family)
    ref = [hf_greedy(model, p, 8) for p in PROMPTS]
    torch._dynamo.reset()
    cfg = SparseSpecConfig(compiler=compiler, fuse_projections=True, num_pages=64, page_size=4, stride=3,
                           min_budget=3, recent=1, max_num_batched_tokens=32, cuda_graphs="pad")
    with capture_reports() as reports:
        outs = LLM(model, cfg).generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == ref
    fused = [dict(r.passes).get("fuse_projections") for r in reports]
    assert fused and all(n == per_layer * 2 for n in fused), fused  # 2 layers


def test_fusion_shares_one_concatenated_copy_across_recompiles_and_sees_weight_changes():
    from sparsespec_compile.passes.fuse_projections import _concatenated

    w = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2, 3))]
    a, _ = _concatenated(w, [None, None])
    b, _ = _concatenated(w, [None, None])
    assert a is b and torch.equal(a, torch.cat([w[0], w[1]]))
    with torch.no_grad():
        w[1].add_(1.0)  # bumps the version counter: the next compile concatenates again
    c, _ = _concatenated(w, [None, None])
    assert c is not a and torch.equal(c, torch.cat([w[0], w[1]]))


def test_linears_of_different_inputs_or_dtypes_stay_apart():
    """o_proj and down_proj read their own inputs; the LM head reads the final norm's output: none is fused."""
    model = _model("llama")
    torch._dynamo.reset()
    with capture_reports() as reports:
        compiled = torch.compile(model, backend="sparsespec", options={"compiler": "eager", "fuse_projections": True})
        with torch.no_grad():
            compiled(torch.tensor([[1, 2, 3]]))
    gm_linears = reports[0]
    assert dict(gm_linears.passes)["fuse_projections"] == 4
