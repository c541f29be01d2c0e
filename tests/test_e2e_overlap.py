"""Host/device overlap (``overlap=True``): step i+1 is launched before step i's results are read; drafts sampled in
step i reach step i+1 as placeholders patched on the device; verifies and prompt-ending prefills sit out a step
until their results are read. Greedy output must still equal HF greedy token for token (fp32, CPU), with or without
the padded graph-shaped steps, and sampled output must be reproducible per seed."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model
from sparsespec_compile.testing.lossless import hf_greedy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 47))]


def _model(family, attn):
    fam = FAMILIES[family]
    return tiny_model(fam.config(layers=2, heads=4, kv_heads=2 if fam.gqa else 4, head_dim=8), attn=attn, seed=0)


def _llm(model, **cfg):
    torch._dynamo.reset()
    base = dict(compiler="eager", num_pages=96, page_size=4, max_num_batched_tokens=32, recent=1, stride=4,
                min_budget=3, overlap=True)
    return LLM(model, SparseSpecConfig(**{**base, **cfg}))


@pytest.mark.parametrize("family,attn,draft,graphs", [("llama", "sdpa", "pillar", "off"),
                                                      ("llama", "sdpa", "pillar", "pad"),
                                                      ("gemma3", "sdpa", "streaming", "pad"),
                                                      ("qwen3", "sdpa", "full", "off")])
def test_overlapped_greedy_equals_hf_greedy(family, attn, draft, graphs):
    model = _model(family, attn)
    ref = [hf_greedy(model, p, 20) for p in PROMPTS]
    llm = _llm(model, draft=draft, cuda_graphs=graphs)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert [o.token_ids for o in outs] == ref
    s = llm.stats()
    assert s["cycles"] > 0 and s["output_tokens"] == 60
    assert not llm.engine.has_unfinished() and llm.engine._inflight is None


def test_overlapped_sampling_is_reproducible_per_seed():
    model = _model("llama", "sdpa")
    params = [SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7 + i) for i in range(3)]
    runs = [[o.token_ids for o in _llm(model).generate(PROMPTS, params, use_tqdm=False)] for _ in range(2)]
    assert runs[0] == runs[1] and all(0 < len(t) <= 16 for t in runs[0])
    assert all(t >= 0 for toks in runs[0] for t in toks)  # no placeholder ever reaches an output


def test_overlapped_greedy_stops_at_eos_like_hf():
    """A verify whose accepted tokens contain EOS finishes the request there, though the next step was already
    launched without it (it sat out): the output is HF's greedy output cut after the first EOS."""
    model = _model("llama", "sdpa")
    ref = hf_greedy(model, PROMPTS[2], 20)
    eos = ref[9]
    model.generation_config.eos_token_id = eos
    out = _llm(model).generate([PROMPTS[2]], SamplingParams(max_tokens=20), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(eos) + 1]


def test_overlap_is_refused_with_tensor_parallel_ranks(monkeypatch):
    import sparsespec_compile.runtime.engine as engine

    monkeypatch.setattr(engine, "tp_world_size", lambda model: 2)
    monkeypatch.setattr(engine, "local_kv_heads", lambda heads, world: heads)
    with pytest.raises(ValueError, match="overlap=True is not supported with tensor parallelism"):
        _llm(_model("llama", "sdpa"))
