"""A users'-CI test file: the checks a model must pass to be served by sparsespec. Run with ``pytest``.

Replace ``load_my_model`` with your model; the tiny random Llama stands in for it here.
"""

import pytest
import torch
from hypothesis import given, settings

from sparsespec_compile.testing import (FAMILIES, check_lossless, check_rewrite, check_sampling, inputs_for,
                                        speculation_settings, tiny_model)


def load_my_model():
    # yours: AutoModelForCausalLM.from_pretrained("path/to/model", dtype=torch.float32).eval()
    return tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2))


my_model = load_my_model()  # at module level: @given needs its config


@pytest.fixture
def my_inputs():
    return {"input_ids": torch.randint(3, my_model.config.vocab_size, (2, 12))}


def test_my_model_rewrite():
    result = check_rewrite(my_model)  # every attention layer rewritten, logits equal within dtype tolerance
    assert result.all_layers_rewritten


@settings(max_examples=3, deadline=None)
@given(inputs=inputs_for(my_model.config, max_len=32, padding=True), s=speculation_settings(max_stride=4))
def test_draft_verify(inputs, s):
    check_lossless(my_model, inputs, **s.kwargs)  # AssertionError: request, first divergent position, both tokens


def test_dense_drafts_and_sampling():
    check_lossless(my_model, [[5, 6, 7], list(range(10, 40))], stride=4, budget=8, dense_drafts=True)
    check_sampling(my_model, temperature=0.8, top_p=0.95)  # chi-square / TV per draft slot + engine z-test


@pytest.mark.sparsespec
def test_compiled_logits(my_inputs, sparsespec_backend, sparsespec_tolerance):
    atol, rtol = sparsespec_tolerance(next(my_model.parameters()).dtype)
    torch.testing.assert_close(sparsespec_backend(my_model)(**my_inputs).logits, my_model(**my_inputs).logits,
                               atol=atol, rtol=rtol)
