"""What ``LLM(model)`` decides at construction: the KV pool's size, and which models it refuses to serve."""

from __future__ import annotations

import pytest

from sparsespec_compile import LLM, SparseSpecConfig
from sparsespec_compile.testing import FAMILIES, tiny_model
from sparsespec_compile.testing.families import MAX_POSITIONS


def _llama(**kw):
    return tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2, **kw), "sdpa")


def test_default_pool_is_what_the_requests_can_need():
    """Issue 15.1: the default pool took half of the machine's memory on a CPU (1.49 M pages for a toy model)."""
    config = SparseSpecConfig(compiler="eager", max_num_seqs=3, stride=4, page_size=16)
    llm = LLM(_llama(), config)
    per_request = -(-(MAX_POSITIONS + config.stride + 1) // config.page_size)
    assert llm.engine.kv.num_pages == 3 * per_request
    assert llm.engine.offload.num_pages <= llm.engine.kv.num_pages


# ---- refused at construction (issue 15.3) -----------------------------------------------------------------------
def test_refuses_a_bidirectional_model():
    """BertLMHeadModel (is_decoder=False) was served and produced tokens differing from HF, with no error."""
    import transformers

    config = transformers.BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, is_decoder=False)
    model = transformers.BertLMHeadModel(config).eval()
    with pytest.raises(ValueError, match="does not attend causally"):
        LLM(model, SparseSpecConfig(compiler="eager"))


def test_refuses_a_model_without_lm_head():
    import transformers

    base = transformers.LlamaModel(FAMILIES["llama"].config(layers=1, heads=2)).eval()
    with pytest.raises(ValueError, match="no LM head.*AutoModelForCausalLM"):
        LLM(base, SparseSpecConfig(compiler="eager"))


def test_refuses_a_model_compiled_with_another_backend():
    import torch

    torch._dynamo.reset()
    with pytest.raises(ValueError, match="compiled with another backend"):
        LLM(torch.compile(_llama(), backend="eager"), SparseSpecConfig(compiler="eager"))


def test_refuses_a_model_whose_attention_was_left_alone(monkeypatch):
    import torch

    import sparsespec_compile.passes.sdpa_attention as sdpa_pass

    real_is_call = sdpa_pass.is_call
    seen: list[str] = []

    def skip_second(node, *targets):  # the pass leaves layer 1's attention alone
        hit = real_is_call(node, *targets)
        if hit and targets == sdpa_pass.SDPA_TARGETS:
            seen.append(node.name)
            return len(seen) != 2
        return hit

    monkeypatch.setattr(sdpa_pass, "is_call", skip_second)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=r"1 of 2 attention layers ran as sparsespec::attention.*inspect"):
        LLM(_llama(), SparseSpecConfig(compiler="eager"))
    torch._dynamo.reset()


# ---- K/V expanded to the query heads by the model itself (issue 15.9) ------------------------------------------
def _repeat_then_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A model's own GQA: K/V tiled to the query heads with ``Tensor.repeat`` (head h reads KV head h % Hkv, not
    HF's h // n_rep), then plain SDPA. The rewrite cannot undo this repeat (its layout is not repeat_kv's)."""
    import torch.nn.functional as F

    n = query.shape[1] // key.shape[1]
    key, value = key.repeat(1, n, 1, 1), value.repeat(1, n, 1, 1)
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    causal = mask is None and query.shape[2] > 1
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_kv_expanded_by_the_model_is_served_exactly():
    """It was rewritten, then failed in the runtime: 'k (53, 4, 16) ... must be [T, Hkv, D] with (Hkv, D) = (2, 16)'.
    The pool is now sized from what the op receives (4 heads), and the output equals HF greedy."""
    import transformers

    from sparsespec_compile.testing import check_lossless

    transformers.AttentionInterface.register("repeat_then_sdpa", _repeat_then_sdpa)
    model = tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2), "repeat_then_sdpa")
    check_lossless(model, [[5, 6, 7, 8, 9, 10, 11], list(range(10, 31))], stride=3, budget=4, max_new_tokens=12)
    llm = LLM(model, SparseSpecConfig(compiler="eager", num_pages=8))
    assert llm.engine.kv.k[0].shape[2] == 4  # [pages, page_size, heads, head_dim]


def test_two_models_of_one_class_with_different_scales_in_one_process():
    """Once Dynamo had compiled one Llama, a second Llama with another head_dim got its attention scale as a tensor
    input ('scale is not a constant'): refused. The runtime's calls specialise floats."""
    import torch

    from sparsespec_compile import SamplingParams
    from sparsespec_compile.testing import hf_greedy

    torch._dynamo.reset()
    for head_dim in (8, 16, 8):
        model = tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1, head_dim=head_dim), "sdpa")
        llm = LLM(model, SparseSpecConfig(compiler="eager", stride=2, min_budget=2, num_pages=32))
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
        assert out.token_ids == hf_greedy(model, [5, 6, 7], 6), head_dim
