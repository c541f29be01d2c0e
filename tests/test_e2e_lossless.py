"""End to end: greedy speculative generation through the compiled graph equals the original model's greedy
``generate`` token for token (fp32, CPU), whatever the family, stride and pillar budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model
from sparsespec_compile.testing.lossless import hf_greedy

# Six families, the attention forms transformers emits for each, sliding windows (mistral, gemma2/3: window 5).
CASES = [("llama", "sdpa"), ("qwen3", "sdpa"), ("mistral", "eager"), ("gemma2", "eager"), ("gpt2", "sdpa"),
         ("olmo2", "eager"), ("gemma3", "sdpa")]
MAX_NEW = 20


def _model(family: str, attn: str, kv_heads: int = 2, seed: int = 0):
    fam = FAMILIES[family]
    cfg = fam.config(layers=2, heads=4, kv_heads=kv_heads if fam.gqa else 4, head_dim=8)
    return tiny_model(cfg, attn=attn, seed=seed)


def _llm(model, **cfg) -> LLM:
    torch._dynamo.reset()  # each test compiles afresh; recompiles of earlier tests must not count
    base = dict(adaptive=False, compiler="eager", num_pages=96, page_size=4, max_num_batched_tokens=32, recent=1)
    return LLM(model, SparseSpecConfig(**{**base, **cfg}))


@pytest.mark.parametrize("family,attn", CASES)
def test_greedy_speculative_equals_hf_generate(family, attn):
    model = _model(family, attn)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 47))]  # mixed lengths, one > page*budget
    ref = [hf_greedy(model, p, MAX_NEW) for p in prompts]
    llm = _llm(model, stride=4, min_budget=3)  # budget 3 << context: the drafts really are sparse
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    for o, r in zip(outs, ref):
        assert o.finish_reason == "length"
        assert o.token_ids == r, f"{family}/{attn}: first divergence at {next(i for i, (a, b) in enumerate(zip(o.token_ids, r)) if a != b)}"
    assert llm.stats()["cycles"] > 0


@settings(max_examples=6)
@given(
    case=st.sampled_from(CASES),
    stride=st.integers(1, 8),
    budget=st.sampled_from([1, 2, 5, 1000]),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    seed=st.integers(0, 3),
)
def test_lossless_property(case, stride, budget, lengths, seed):
    family, attn = case
    model = _model(family, attn, seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]
    ref = [hf_greedy(model, p, 12) for p in prompts]
    llm = _llm(model, stride=stride, min_budget=budget, recent=min(1, budget))
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == ref


def test_budget_covering_context_drafts_exactly_like_the_target():
    """Sparse attention with budget >= context is full attention: every draft is accepted."""
    model = _model("llama", "sdpa")
    llm = _llm(model, stride=4, min_budget=1000, recent=4)
    llm.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(max_tokens=21, ignore_eos=True), use_tqdm=False)
    s = llm.stats()
    assert s["cycles"] >= 6 and s["mean_accepted"] == pytest.approx(4.0)


@pytest.mark.parametrize("draft", ["streaming", "full"])
def test_other_drafts_are_lossless_too(draft):
    model = _model("qwen3", "sdpa")
    prompt = list(range(30, 60))
    llm = _llm(model, stride=3, min_budget=4, draft=draft)
    out = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == hf_greedy(model, prompt, 16)


def test_stride_zero_is_plain_decoding():
    model = _model("llama", "sdpa")
    prompt = [4, 5, 6]
    llm = _llm(model, stride=0)
    out = llm.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == hf_greedy(model, prompt, 10)
    assert llm.stats()["cycles"] == 0


def test_sampling_is_reproducible_per_request_seed():
    model = _model("llama", "sdpa")
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    a = _llm(model, stride=3, min_budget=2).generate([[5, 6, 7]], params, use_tqdm=False)[0].token_ids
    b = _llm(model, stride=3, min_budget=2).generate([[5, 6, 7], [8, 9]], [params, SamplingParams(
        max_tokens=5, temperature=1.0, seed=1)], use_tqdm=False)[0].token_ids
    assert a == b and len(a) == 12  # a neighbour in the batch does not change a seeded request's tokens


def test_bad_requests_get_errors_and_the_others_finish():
    model = _model("llama", "sdpa")
    good = [5, 6, 7, 8]
    llm = _llm(model, stride=2, min_budget=2)
    too_long = list(range(3, 90)) * 3  # 261 tokens > max_position_embeddings (256)
    outs = llm.generate([[], good, too_long, [5, 500]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert outs[0].finish_reason.startswith("error:") and "empty" in outs[0].finish_reason
    assert outs[2].finish_reason.startswith("error:") and "max_model_len" in outs[2].finish_reason
    assert outs[3].finish_reason.startswith("error:") and "vocabulary" in outs[3].finish_reason
    assert outs[1].token_ids == hf_greedy(model, good, 8)


def test_invalid_sampling_values_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_triton_kernels_in_the_engine_are_lossless_too():
    """The runtime with the Triton kernels (CPU interpreter in CI) instead of the PyTorch references."""
    model = _model("qwen3", "sdpa")
    prompt = list(range(30, 41))
    llm = _llm(model, stride=3, min_budget=3, attention_impl="triton")
    out = llm.generate([prompt, [7, 8]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert out[0].token_ids == hf_greedy(model, prompt, 8)
    assert out[1].token_ids == hf_greedy(model, [7, 8], 8)
    assert llm.stats()["cycles"] > 0


def test_varying_token_counts_compile_one_graph():
    """Steps carry different token counts (prefill chunks, drafts, verifies): Dynamo must not recompile per count."""
    from sparsespec_compile.backend import sparsespec_backend

    compiles = []

    def counting_backend(gm, example_inputs, **kw):
        compiles.append(gm)
        return sparsespec_backend(gm, example_inputs, options={"compiler": "eager"})

    model = _model("llama", "sdpa")
    torch._dynamo.reset()
    llm = LLM(torch.compile(model, backend=counting_backend),
              SparseSpecConfig(adaptive=False, compiler="eager", num_pages=96, page_size=4, stride=3, min_budget=2, recent=1,
                               max_num_batched_tokens=32))
    llm.generate([list(range(5, 30)), [7, 8, 9], [4]], SamplingParams(max_tokens=14, ignore_eos=True), use_tqdm=False)
    assert llm.stats()["steps"] > 10
    assert len(compiles) <= 2, f"{len(compiles)} graphs compiled for one workload"
