"""Planted faults (mutation tests, issue 7): each must make ``check_rewrite`` fail, with a message that says where.

A check that passes on a broken rewrite proves nothing; these plant the bugs a rewrite is most likely to have
and assert the public check catches them.
"""

from __future__ import annotations

import math

import pytest
import torch

import sparsespec_compile.ops as ops
import sparsespec_compile.passes.eager_attention as eager_pass
import sparsespec_compile.passes.sdpa_attention as sdpa_pass
from sparsespec_compile.passes.graph_utils import shape
from sparsespec_compile.testing import FAMILIES, check_rewrite, tiny_model


def _model(family, attn, layers=2):
    fam = FAMILIES[family]
    config = fam.config(layers=layers, heads=4, kv_heads=2 if fam.gqa else None)
    return tiny_model(config, attn)


def test_op_that_drops_the_scale_is_caught(monkeypatch):
    original = ops._original_attention

    def no_scale(q, k, v, attn_mask, scale, is_causal, softcap, math_):
        return original(q, k, v, attn_mask, 1.0, is_causal, softcap, math_)

    monkeypatch.setattr(ops, "_original_attention", no_scale)
    where = r"logits differ.*worst at batch \d+, position \d+.*first diverging layer: 0"
    with pytest.raises(AssertionError, match=where):
        check_rewrite(_model("llama", "sdpa"))


def test_pass_that_records_the_default_scale_is_caught_on_gemma(monkeypatch):
    """1/sqrt(head_dim) instead of the model's scale: invisible on Llama, caught on Gemma3 (query_pre_attn_scalar)."""
    real_insert = sdpa_pass.insert_attention

    def default_scale(graph, out, q, k, v, mask, scale, *rest):
        return real_insert(graph, out, q, k, v, mask, 1.0 / math.sqrt(shape(q)[3]), *rest)

    monkeypatch.setattr(sdpa_pass, "insert_attention", default_scale)
    check_rewrite(_model("llama", "sdpa", layers=1))  # the fault hides where the default is right ...
    with pytest.raises(AssertionError, match="first diverging layer: 0"):
        check_rewrite(_model("gemma3", "sdpa", layers=1))  # ... which is why FAMILIES spans scales


def test_pass_that_drops_the_mask_is_caught(monkeypatch):
    real_insert = eager_pass.insert_attention

    def no_mask(graph, out, q, k, v, mask, *rest):
        return real_insert(graph, out, q, k, v, None, *rest)

    monkeypatch.setattr(eager_pass, "insert_attention", no_mask)
    with pytest.raises(AssertionError, match="logits differ"):
        check_rewrite(_model("mistral", "eager", layers=1))


def test_pass_that_silently_skips_a_layer_is_caught(monkeypatch):
    """Logits stay equal when a layer is simply not rewritten: only the layer count catches it."""
    real_is_call = sdpa_pass.is_call
    seen: list[str] = []

    def skip_second(node, *targets):
        hit = real_is_call(node, *targets)
        if hit and targets == sdpa_pass.SDPA_TARGETS:
            seen.append(node.name)
            return len(seen) != 2
        return hit

    monkeypatch.setattr(sdpa_pass, "is_call", skip_second)
    with pytest.raises(AssertionError, match=r"1 attention node\(s\) rewritten, expected 2.*missing \[1\]"):
        check_rewrite(_model("qwen2", "sdpa"), {"input_ids": torch.randint(3, 96, (1, 5))})
