"""The padded static-shape step path (what a CUDA graph captures and replays; ``cuda_graphs="pad"`` runs it without
capture on the CPU) is exact: greedy output equals HF greedy token for token, and every speculative cycle accepts
exactly what the unpadded path accepts (so the pillar refresh, padding score rows included, is unchanged)."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model
from sparsespec_compile.testing.lossless import hf_greedy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 47))]


def _model(family, attn):
    fam = FAMILIES[family]
    return tiny_model(fam.config(layers=2, heads=4, kv_heads=2 if fam.gqa else 4, head_dim=8), attn=attn, seed=0)


def _run(model, graphs, max_new, prompts=PROMPTS, **cfg):
    torch._dynamo.reset()
    base = dict(adaptive=False, compiler="eager", num_pages=96, page_size=4, max_num_batched_tokens=32, recent=1, stride=4,
                min_budget=3, cuda_graphs=graphs)
    llm = LLM(model, SparseSpecConfig(**{**base, **cfg}))
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_new, ignore_eos=True), use_tqdm=False)
    return outs, llm.stats()


@pytest.mark.parametrize("family,attn,draft", [("llama", "sdpa", "pillar"), ("gemma3", "sdpa", "pillar"),
                                               ("mistral", "eager", "streaming"), ("qwen3", "sdpa", "full")])
def test_padded_steps_equal_hf_greedy_and_the_unpadded_path(family, attn, draft):
    model = _model(family, attn)
    ref = [hf_greedy(model, p, 20) for p in PROMPTS]
    padded, stats = _run(model, "pad", 20, draft=draft)
    assert [o.token_ids for o in padded] == ref
    assert stats["graph_steps"] > 0.8 * stats["steps"]  # only the steps with a prefill chunk ran unpadded
    plain, _ = _run(model, "off", 20, draft=draft)
    assert [o.metrics["accepted"] for o in padded] == [o.metrics["accepted"] for o in plain]


def test_padded_steps_with_the_triton_kernels():
    """Kernel grids at bucket maxima, zero-length padding requests and scratch-row score rows, in the interpreter."""
    model = _model("llama", "sdpa")
    prompts = PROMPTS[:2]
    ref = [hf_greedy(model, p, 10) for p in prompts]
    padded, stats = _run(model, "pad", 10, prompts=prompts, attention_impl="triton")
    assert [o.token_ids for o in padded] == ref and stats["graph_steps"] > 0
    plain, _ = _run(model, "pad", 10, prompts=prompts, attention_impl="reference")
    assert [o.metrics["accepted"] for o in padded] == [o.metrics["accepted"] for o in plain]


def test_graphs_on_refuse_a_cpu_model():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        _run(_model("llama", "sdpa"), "on", 2)


def test_deferred_all_layer_selection_equals_per_layer_selection(monkeypatch):
    """ForwardContext.layer_scores (select once for all layers after the forward) picks the same pillars as each
    layer selecting its own: identical acceptance in every cycle."""
    import sparsespec_compile.runtime.step_forward as step_forward

    model = _model("llama", "sdpa")
    deferred, s1 = _run(model, "off", 20)
    monkeypatch.setattr(step_forward, "step_score_buffer", lambda *a, **k: None)  # every layer selects itself
    per_layer, s2 = _run(model, "off", 20)
    assert [o.token_ids for o in deferred] == [o.token_ids for o in per_layer]
    assert [o.metrics["accepted"] for o in deferred] == [o.metrics["accepted"] for o in per_layer]
    assert s1["cycles"] > 0


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_runtime_graph_builds_no_attention_mask(family, monkeypatch):
    """The runtime passes a prepared 4D mask, so HF builds none: without it the flattened batch's restarting position
    ids look like packed sequences and every forward built a T x T mask (cumsum + arange + compares) that
    sparsespec::attention never reads. The output is unchanged (HF greedy)."""
    import sparsespec_compile.backend as backend

    targets: list[str] = []
    run_passes = backend.PassManager.__call__

    def recording(self, gm):
        report = run_passes(self, gm)
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return report

    monkeypatch.setattr(backend.PassManager, "__call__", recording)
    model = _model(family, "sdpa")
    outs, _ = _run(model, "pad", 6, prompts=PROMPTS[:2])
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 6) for p in PROMPTS[:2]]
    assert targets and not [t for t in targets if "cumsum" in t or "arange" in t]


def test_a_forward_without_the_rewrite_fails_its_requests_loudly():
    """If the model the runtime calls runs no sparsespec attention (not compiled with the backend, or Dynamo fell
    back to the original forward), plain attention over the flattened batch would give wrong tokens silently: the
    step fails instead, naming the cause, and only its requests end (with that error)."""
    model = _model("llama", "sdpa")
    torch._dynamo.reset()
    llm = LLM(model, SparseSpecConfig(adaptive=False, compiler="eager", num_pages=96, page_size=4, stride=4, min_budget=3, recent=1,
                                      max_num_batched_tokens=32))
    llm.engine.compiled = model  # the original forward: no sparsespec::attention op runs
    outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert all(o.finish_reason.startswith("error: step failed: the compiled model ran 0 sparsespec attention op(s)")
               for o in outs), [o.finish_reason for o in outs]
