"""End to end, the hybrid draft (sinks + recent window + pillars): greedy output equals HF greedy at small budgets
(fp32, CPU); a budget covering the context accepts every draft with recall 1.0; at the split's extremes the run is
the pillar run and the streaming run, cycle for cycle."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model
from sparsespec_compile.testing.lossless import hf_greedy

MAX_NEW = 16
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 47))]


def _model(family: str, attn: str, seed: int = 0):
    fam = FAMILIES[family]
    return tiny_model(fam.config(layers=2, heads=4, kv_heads=2 if fam.gqa else 4, head_dim=8), attn=attn, seed=seed)


def _run(model, prompts=PROMPTS, max_tokens=MAX_NEW, **cfg):
    torch._dynamo.reset()
    base = dict(adaptive=False, compiler="eager", num_pages=96, page_size=4, max_num_batched_tokens=32, recent=1,
                stride=4, draft="hybrid")
    llm = LLM(model, SparseSpecConfig(**{**base, **cfg}))
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return llm, outs


# (family, attention form, split, extra config): sliding windows (gemma3, mistral), and the padded static-shape path
# CUDA graphs replay (padding score rows go to the scratch row)
CASES = [("llama", "sdpa", "request", {}), ("gemma3", "sdpa", "layer", {}),
         ("mistral", "eager", 0.5, {"cuda_graphs": "pad"})]


@pytest.mark.parametrize("family,attn,split,extra", CASES)
def test_greedy_hybrid_equals_hf_generate(family, attn, split, extra):
    model = _model(family, attn)
    ref = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
    llm, outs = _run(model, min_budget=6, hybrid_split=split, **extra)  # 4 sinks + window + pillars of 6 << context
    assert [o.token_ids for o in outs] == ref
    s = llm.stats()
    assert s["cycles"] > 0 and s["recall_verifies"] > 0 and all(0.0 <= r <= 1.0 for r in s["recall_by_layer"])


def test_triton_kernels_in_the_engine():
    """The hybrid split and select in Triton (the interpreter: slow, so a small run)."""
    model = _model("qwen3", "sdpa")
    prompts = [list(range(30, 41)), [7, 8]]
    llm, outs = _run(model, prompts=prompts, max_tokens=8, stride=3, min_budget=6, attention_impl="triton")
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 8) for p in prompts]
    assert llm.stats()["recall_verifies"] > 0


def test_budget_covering_the_context_accepts_every_draft_with_recall_one():
    model = _model("llama", "sdpa")
    llm, outs = _run(model, prompts=[[5, 6, 7, 8], [9, 10]], max_tokens=21, min_budget=1000, recent=4)
    s = llm.stats()
    assert s["cycles"] >= 6 and s["mean_accepted"] == pytest.approx(4.0)
    assert s["recall_by_layer"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert all(r == pytest.approx(1.0, abs=1e-5) for o in outs for r in o.metrics["recall"])


@pytest.mark.parametrize("split,other", [(0.0, "pillar"), (1.0, "streaming")])
def test_split_extremes_are_the_pillar_and_streaming_runs(split, other):
    """Same draft sets, so the same accepted drafts in every cycle of every request (random weights: acceptance
    is far from 1, so a different set would show)."""
    model = _model("qwen3", "sdpa", seed=1)
    kw = dict(min_budget=6, recent=2)
    prompts = PROMPTS[::2]
    _, hybrid = _run(model, prompts=prompts, max_tokens=12, hybrid_split=split, **kw)
    _, ref = _run(model, prompts=prompts, max_tokens=12, draft=other, **kw)
    assert [o.metrics["accepted"] for o in hybrid] == [o.metrics["accepted"] for o in ref]
    assert [o.token_ids for o in hybrid] == [o.token_ids for o in ref]
