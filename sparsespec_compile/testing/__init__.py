"""Testing helpers for users' own CI (and this project's tests): prove the sparsespec rewrite changed nothing.

    from sparsespec_compile.testing import check_rewrite, tiny_model, FAMILIES
    report = check_rewrite(my_model)              # every attention layer rewritten, logits equal
    assert report.all_layers_rewritten

Hypothesis strategies: ``model_configs(families=..., attn=...)`` draws tiny model specs (layers, heads, KV heads
/ GQA ratio, head dim) over ``FAMILIES``; ``inputs_for(config, max_len=...)`` draws input_ids + attention_mask
(batch, length, left padding). Depends only on torch, transformers and hypothesis.
"""

from .checks import TOLERANCES, RewriteCheck, check_rewrite, default_inputs, tiny_model, tolerance
from .families import FAMILIES, Family, family_of
from .strategies import ModelSpec, family_attn_pairs, inputs_for, model_configs

__all__ = [
    "FAMILIES",
    "Family",
    "ModelSpec",
    "RewriteCheck",
    "TOLERANCES",
    "check_rewrite",
    "default_inputs",
    "family_attn_pairs",
    "family_of",
    "inputs_for",
    "model_configs",
    "tiny_model",
    "tolerance",
]
