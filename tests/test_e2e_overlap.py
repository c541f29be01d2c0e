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
    base = dict(adaptive=False, compiler="eager", num_pages=96, page_size=4, max_num_batched_tokens=32, recent=1, stride=4,
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


# ---- stride 0: a plain decode's token enters the next step as a placeholder ------------------------------------
@pytest.mark.parametrize("graphs", ["off", "pad"])
def test_stride_zero_overlapped_equals_hf_greedy_one_step_per_token(graphs):
    """Nothing is held at stride 0 except a prompt's first token: 20 tokens take 19 decode steps + the prefill + the
    one step the prefill's request sits out (+ the last step's drain), never one step per token more."""
    model = _model("llama", "sdpa")
    ref = [hf_greedy(model, p, 20) for p in PROMPTS]
    llm = _llm(model, stride=0, cuda_graphs=graphs)
    assert llm.engine.overlap
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == ref and [o.finish_reason for o in outs] == ["length"] * 3
    s = llm.stats()
    assert s["output_tokens"] == 60 and s["steps"] <= 22
    assert not llm.engine.has_unfinished() and llm.engine._inflight is None


def test_stride_zero_overlapped_stops_like_hf_though_the_next_step_ran():
    """The step after a stop token was launched before the token was known: its token is computed and dropped,
    the output ends exactly at the stop (EOS from the generation config, and a stop_token_ids entry)."""
    model = _model("llama", "sdpa")
    ref = hf_greedy(model, PROMPTS[2], 20)
    out = _llm(model, stride=0).generate([PROMPTS[2]], SamplingParams(max_tokens=20, stop_token_ids=[ref[6]]),
                                         use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(ref[6]) + 1]
    model.generation_config.eos_token_id = ref[9]
    outs = _llm(model, stride=0).generate([PROMPTS[2], PROMPTS[0]], SamplingParams(max_tokens=20), use_tqdm=False)
    assert outs[0].finish_reason == "stop" and outs[0].token_ids == ref[: ref.index(ref[9]) + 1]
    assert all(t >= 0 for o in outs for t in o.token_ids)


def test_stride_zero_overlapped_sampling_equals_the_synchronous_engine():
    """Each request samples from its own seeded generator in the same order either way: overlap changes when the
    host reads a token, not which token is drawn."""
    model = _model("llama", "sdpa")
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11 + i) for i in range(3)]
    runs = [[o.token_ids for o in _llm(model, stride=0, overlap=ov).generate(PROMPTS, params, use_tqdm=False)]
            for ov in (True, False)]
    assert runs[0] == runs[1] and all(0 < len(t) <= 12 for t in runs[0])


def test_stride_zero_overlapped_under_kv_pressure_equals_hf_greedy():
    """A request evicted (offloaded or preempted) while its last token is still a placeholder resumes with the real
    token: with a pool of about one request and six requests, outputs equal HF greedy."""
    model = _model("llama", "sdpa")
    prompts = [[5, 6, 7, 8, 9], [12, 13, 14, 15, 16, 17, 18], list(range(20, 31)), [40, 41, 42, 43, 44, 45]]
    ref = [hf_greedy(model, p, 16) for p in prompts]
    for host_pages in (64, 1):  # offload, then recompute preemption (host pool too small)
        llm = _llm(model, stride=0, num_pages=8, host_kv_pages=host_pages)
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
        assert [o.token_ids for o in outs] == ref, host_pages
        sched = llm.engine.scheduler
        assert sched.num_swap_outs + sched.num_recomputes > 0
