"""FuseProjectionsPass (``fuse_projections=True``): linear layers that read one input with parameter weights (q/k/v,
gate/up) become one GEMM and a split. Nothing the model computes changes: greedy output equals HF greedy token for
token (fp32, CPU), through the runtime's padded steps, with Dynamo's graph and with Inductor's."""

from __future__ import annotations

import operator

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
    cfg = SparseSpecConfig(adaptive=False, compiler=compiler, fuse_projections=True, num_pages=64, page_size=4, stride=3,
                           min_budget=3, recent=1, max_num_batched_tokens=32, cuda_graphs="pad")
    with capture_reports() as reports:
        outs = LLM(model, cfg).generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == ref
    fused = [dict(r.passes).get("fuse_projections") for r in reports]
    assert fused and all(n == per_layer * 2 for n in fused), fused  # 2 layers


def test_fusion_shares_one_fused_copy_across_recompiles_and_refreshes_it_in_place():
    from sparsespec_compile.passes.fuse_projections import fused_weight

    w = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2, 3))]
    a = fused_weight(w)
    assert fused_weight(w) is a and torch.equal(a.tensor, torch.cat([w[0], w[1]]))
    ptr, version = a.tensor.data_ptr(), a.tensor._version
    a.refresh(w)
    assert a.tensor._version == version  # nothing changed: no copy
    with torch.no_grad():
        w[1].add_(1.0)
    assert fused_weight(w) is a  # same object, same storage (a CUDA graph reading it stays valid), new values
    assert a.tensor.data_ptr() == ptr and torch.equal(a.tensor, torch.cat([w[0], w[1]]))
    with pytest.raises(RuntimeError, match="changed shape"):
        a.refresh([w[0], torch.nn.Parameter(torch.randn(3, 3))])


def _fused_tensors(model):
    from sparsespec_compile.passes.fuse_projections import _CACHE_ATTR

    return [fw for p in model.parameters() for fw in getattr(p, _CACHE_ATTR, {}).values()]


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_compiled_fused_graph_sees_weights_changed_after_the_compile(compiler):
    """In place (load_state_dict, copy_, an RL weight sync) or by replacing the parameter: the next call reads the new
    weights, like the unfused graph does; calls without a change copy nothing."""
    model = _model("qwen2", layers=1)  # q/k/v with biases: fused weights and fused biases
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsespec", options={"compiler": compiler, "fuse_projections": True})
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        compiled(x)
        fused = _fused_tensors(model)
        assert len(fused) == 3  # q/k/v weight, q/k/v bias, gate/up weight
        versions = [fw.tensor._version for fw in fused]
        compiled(x)
        assert [fw.tensor._version for fw in fused] == versions
        attn = model.model.layers[0].self_attn
        attn.k_proj.weight.mul_(-2.0)
        attn.q_proj.bias.add_(0.5)
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
        mlp = model.model.layers[0].mlp
        mlp.up_proj.weight = torch.nn.Parameter(torch.randn_like(mlp.up_proj.weight))  # a replaced parameter
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_runtime_refreshes_fused_weights_at_each_generate():
    """CUDA-graph replays skip the per-call check, so ``LLM.generate`` refreshes the fused copies first."""
    from sparsespec_compile.passes.fuse_projections import refresh_fused_weights

    model = _model("llama", layers=1)
    torch._dynamo.reset()
    llm = LLM(model, SparseSpecConfig(compiler="eager", fuse_projections=True, num_pages=64, page_size=4, stride=0,
                                      max_num_batched_tokens=32, cuda_graphs="pad"))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    llm.generate(PROMPTS, params, use_tqdm=False)
    assert refresh_fused_weights(model) == 0
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.mul_(3.0)
        model.model.layers[0].mlp.gate_proj.weight.mul_(-1.0)
    assert refresh_fused_weights(model) == 2
    assert all(torch.equal(fw.tensor, torch.cat([p.detach() for p in fw.parts])) for fw in _fused_tensors(model))
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 6) for p in PROMPTS]


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


@pytest.mark.parametrize("dynamic", [False, True])
def test_qkv_parts_reach_their_view_without_a_copy(monkeypatch, dynamic):
    """q/k/v are only `.view(..., -1, head_dim)`-ed, which a column slice allows: no `contiguous` copy for them
    (static and symbolic shapes alike); gate/up feed pointwise ops and keep theirs."""
    from sparsespec_compile.passes.fuse_projections import FuseProjectionsPass

    graphs = []
    run = FuseProjectionsPass.__call__

    def recording(self, gm, example_inputs):
        run(self, gm, example_inputs)
        graphs.append(gm)

    monkeypatch.setattr(FuseProjectionsPass, "__call__", recording)
    model = _model("llama", layers=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsespec", dynamic=dynamic,
                             options={"compiler": "eager", "fuse_projections": True})
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    copied = [n for n in graphs[-1].graph.nodes if n.op == "call_method" and n.target == "contiguous"
              and n.args[0].op == "call_function" and n.args[0].target is operator.getitem]
    assert len(copied) == 2  # gate and up; q, k and v go to their views directly
