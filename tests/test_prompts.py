"""What ``LLM.generate`` accepts as prompts: a malformed call raises, a malformed prompt fails only its own request,
each with an error that says what is accepted (issue 15.8)."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.prompts import encode, split_prompts
from sparsespec_compile.testing import FAMILIES, hf_greedy, tiny_model

PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    torch._dynamo.reset()
    model = tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1), "sdpa")
    return LLM(model, SparseSpecConfig(compiler="eager", stride=2, min_budget=2, num_pages=64, page_size=4))


def test_a_2d_tensor_is_refused_for_the_call(llm):
    """It was 'Boolean value of Tensor with more than one value is ambiguous'."""
    with pytest.raises(ValueError, match="2-D tensor of prompts.*does not say which ids are padding.*list"):
        llm.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), PARAMS, use_tqdm=False)


def test_a_none_prompt_fails_only_its_request(llm):
    """[None] aborted the whole call."""
    outs = llm.generate([None, [5, 6, 7]], PARAMS, use_tqdm=False)
    assert outs[0].finish_reason.startswith("error:") and "is not a prompt" in outs[0].finish_reason
    assert "string" in outs[0].finish_reason and "token ids" in outs[0].finish_reason
    assert outs[1].token_ids == hf_greedy(llm.model, [5, 6, 7], 4)


def test_float_ids_are_an_error_not_truncated(llm):
    """[1.5, 2] was silently generated from [1, 2]."""
    (out,) = llm.generate([1.5, 2], PARAMS, use_tqdm=False)
    assert out.finish_reason.startswith("error:") and "item 0 of the prompt is 1.5 (float)" in out.finish_reason
    (out,) = llm.generate([torch.tensor([1.0, 2.0])], PARAMS, use_tqdm=False)
    assert "1-D integer token ids" in out.finish_reason


def test_accepted_forms(llm):
    ids = [5, 6, 7]
    want = hf_greedy(llm.model, ids, 4)
    for prompts in (ids, [ids], (5, 6, 7), torch.tensor(ids), [torch.tensor(ids)]):
        assert [o.token_ids for o in llm.generate(prompts, PARAMS, use_tqdm=False)] == [want], prompts


def test_malformed_calls():
    with pytest.raises(ValueError, match="no prompts"):
        split_prompts([])
    with pytest.raises(TypeError, match="prompts of type dict"):
        split_prompts({"input_ids": [1]})
    with pytest.raises(ValueError, match="needs a tokenizer"):
        encode("hello")
