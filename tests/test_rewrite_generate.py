"""HF ``generate`` with the compiled forward gives the uncompiled model's greedy tokens (issue 2, section 6 (d)).

``model.forward = torch.compile(model.forward, backend="sparsespec")`` is how a user drops the backend into
their own generation loop: prefill (is_causal or padding mask), then decode steps with a growing DynamicCache
or a fixed-size StaticCache (masked SDPA over max_cache_len keys, K/V repeated by expand + reshape).
"""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile.backend import capture_reports
from sparsespec_compile.testing import FAMILIES, tiny_model

# Regression: a graph-wide DCE in passes/cleanup.py once deleted StaticCache's in-place K/V writes
# (`keys.index_copy_(2, cache_position, k)`, a call_method with no users), so every layer attended the zeroed
# cache and the first generated token already differed. Minimal form: test_backend_api.py::
# test_inplace_cache_write_survives_the_rewrite.
CASES = [
    # (family, attn, cache_implementation, padded batch)
    pytest.param("llama", "sdpa", None, True, id="llama-sdpa-dynamic-padded"),
    pytest.param("gemma2", "eager", None, False, id="gemma2-eager-dynamic-single"),
    pytest.param("qwen3", "sdpa", "static", True, id="qwen3-sdpa-static-padded"),
    pytest.param("gpt_neox", "eager", "static", False, id="gpt_neox-eager-static-single"),
]


def _prompt(config, padded: bool):
    gen = torch.Generator().manual_seed(0)
    if not padded:
        return {"input_ids": torch.randint(3, config.vocab_size, (1, 6), generator=gen)}
    ids = torch.randint(3, config.vocab_size, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    ids[0, :2] = config.pad_token_id
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family,attn,cache,padded", CASES)
def test_generate_greedy_tokens_equal(family, attn, cache, padded):
    fam = FAMILIES[family]
    config = fam.config(layers=2, heads=4, kv_heads=2 if fam.gqa else None)
    model = tiny_model(config, attn)
    prompt = _prompt(config, padded)
    gen_kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=config.pad_token_id, eos_token_id=None)
    if cache:
        gen_kw["cache_implementation"] = cache
    with torch.no_grad():
        expected = model.generate(**prompt, **gen_kw)
    torch._dynamo.reset()
    try:
        model.forward = torch.compile(model.forward, backend="sparsespec", options={"compiler": "eager"})
        with capture_reports() as reports, torch.no_grad():
            got = model.generate(**prompt, **gen_kw)
    finally:
        del model.forward  # back to the class's forward
        torch._dynamo.reset()
    assert got.shape[1] == prompt["input_ids"].shape[1] + 5
    assert torch.equal(got, expected), f"compiled greedy tokens {got.tolist()} != eager {expected.tolist()}"
    # prefill and decode each traced at least once, and every graph had all its attention layers rewritten
    assert len(reports) >= 2, [str(r) for r in reports]
    for r in reports:
        assert r.num_rewritten == config.num_hidden_layers and not r.left_alone, str(r)
