"""A module backward hook inside the attention (transformers 5.17's ``tp_plan="auto"`` puts a gradient all-reduce
on Qwen3's q/k norms) splits Dynamo's graph there. The runtime drops such hooks, which inference never runs, and
refuses to run a forward whose attention layers could not be told apart."""

from __future__ import annotations

import pytest
import torch
import transformers

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime import engine as engine_mod
from sparsespec_compile.runtime.step_forward import check_layers_ran
from sparsespec_compile.testing.checks import tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]


def hooked_qwen3():
    cfg = transformers.Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    model = tiny_model(cfg)
    for layer in model.model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.register_full_backward_hook(lambda mod, gin, gout: None)
    return model


def generate(model):
    llm = LLM(model, SparseSpecConfig(adaptive=False, compiler="eager", num_pages=32, page_size=4, stride=2, min_budget=2, recent=1))
    return llm.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)


def test_hooks_inside_attention_are_dropped_and_output_equals_hf():
    model = hooked_qwen3()
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    outs = generate(model)
    assert [o.token_ids for o in outs] == ref
    assert not any(m._backward_hooks for m in model.modules())


def test_with_the_hooks_kept_the_runtime_refuses_instead_of_mixing_layers(monkeypatch):
    monkeypatch.setattr(engine_mod, "drop_backward_hooks", lambda model: [])
    torch._dynamo.reset()  # no code compiled for the hook-free model of the test before
    with pytest.raises(ValueError, match="more than once"):  # refused when the LLM is built, not per request
        generate(hooked_qwen3())


def test_check_layers_ran_names_the_problem():
    check_layers_ran([0, 1, 2], 3)
    with pytest.raises(RuntimeError, match="ran 2 sparsespec attention op"):
        check_layers_ran([0, 1], 3)
    with pytest.raises(RuntimeError, match=r"layer\(s\) \[0\] more than once"):
        check_layers_ran([0, 0, 1], 3)
