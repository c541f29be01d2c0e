"""Testing helpers for users' own CI (and this project's tests): prove the sparsespec rewrite changed nothing.

    from sparsespec_compile.testing import check_rewrite, tiny_model, FAMILIES
    report = check_rewrite(my_model)              # every attention layer rewritten, logits equal
    assert report.all_layers_rewritten

Hypothesis strategies: ``model_configs(families=..., attn=...)`` draws tiny model specs (layers, heads, KV heads
/ GQA ratio, head dim) over ``FAMILIES``; ``inputs_for(config, max_len=...)`` draws input_ids + attention_mask
(batch, length, left padding); ``prompts(vocab_size)`` draws token-id prompts and ``speculation_settings()``
(stride, budget) pairs for ``check_lossless``. Depends only on torch, transformers and hypothesis.

    @given(inputs_for(config, max_len=64), speculation_settings())
    def test_draft_verify(inputs, s):
        check_lossless(model, inputs, **s.kwargs)      # greedy speculative output == HF greedy generate
    check_sampling(model)                               # sampled tokens follow the target softmax
"""

from .checks import TOLERANCES, RewriteCheck, check_rewrite, default_inputs, tiny_model, tolerance
from .families import FAMILIES, Family, family_of
from .lossless import LosslessCheck, check_lossless, hf_greedy, prompts_from_inputs
from .sampling import SamplingCheck, check_sampling
from .strategies import (ModelSpec, SpeculationSettings, family_attn_pairs, inputs_for, model_configs, prompts,
                         speculation_settings)

__all__ = [
    "FAMILIES",
    "Family",
    "LosslessCheck",
    "ModelSpec",
    "RewriteCheck",
    "SamplingCheck",
    "SpeculationSettings",
    "TOLERANCES",
    "check_lossless",
    "check_rewrite",
    "check_sampling",
    "default_inputs",
    "family_attn_pairs",
    "family_of",
    "hf_greedy",
    "inputs_for",
    "model_configs",
    "prompts",
    "prompts_from_inputs",
    "speculation_settings",
    "tiny_model",
    "tolerance",
]
