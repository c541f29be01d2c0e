"""The process engine (what ``sparsespec serve`` runs) through the real HTTP app: the step loop in a spawned child
that builds the LLM from a tiny model directory. Greedy text equals ``LLM.generate``; a client that goes away aborts
its request in the child; a killed child fails the live requests and ``/health`` says so (last: it ends the
module's engine)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal

import httpx
import openai
import pytest
from server_fixture import serving, wait_until

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.serve.app import engine_app
from sparsespec_compile.serve.process_engine import ProcessEngine
from sparsespec_compile.testing import FAMILIES, tiny_model

MODEL = "tiny"
PROMPTS = ["w5 w6", "w7 w8 w9", "w10 w11 w12 w13"]
N = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory, word_tokenizer):
    model_dir = tmp_path_factory.mktemp("tiny")
    tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1), "sdpa", seed=0).save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    config = SparseSpecConfig(compiler="eager", stride=3, min_budget=4, page_size=4, num_pages=64, max_num_seqs=4,
                              offload=False)
    want = LLM(str(model_dir), config).generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True),
                                                use_tqdm=False)
    engine = ProcessEngine(functools.partial(LLM, str(model_dir), config), stream_interval=1)
    with serving(engine_app(engine, model_name=MODEL)) as (base, server):
        yield base, server, [o.text for o in want]


def _metric(base, name, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total



def test_greedy_whole_and_streamed_equal_generate(served):
    base, _, want = served
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    args = dict(model=MODEL, max_tokens=N, temperature=0, extra_body={"ignore_eos": True})
    assert [c.completions.create(prompt=p, **args).choices[0].text for p in PROMPTS] == want
    streamed = ["".join(ch.choices[0].text for ch in c.completions.create(prompt=p, stream=True, **args))
                for p in PROMPTS[:2]]
    assert streamed == want[:2]


def _stream_lines(base, prompt, max_tokens, then):
    """Stream a completion; call ``then(lines so far)`` after each line, stop when it returns True."""
    async def run():
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        lines = []
        async with httpx.AsyncClient(timeout=60) as h:
            async with h.stream("POST", f"{base}/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        if then(lines):
                            break
        return lines

    return asyncio.run(run())


def test_a_disconnect_aborts_the_request_in_the_child(served):
    base, server, _ = served
    aborted = _metric(base, "sparsespec_request_finished_total", finish_reason="abort")
    _stream_lines(base, PROMPTS[1], 200, lambda lines: len(lines) == 3)  # then the connection closes
    wait_until(lambda: _metric(base, "sparsespec_request_finished_total", finish_reason="abort") == aborted + 1, 20.0)
    wait_until(lambda: not server.engine._live and _metric(base, "sparsespec_kv_pages_used") == 0, 20.0)


def test_a_killed_engine_process_fails_live_requests_and_health(served):
    base, server, _ = served
    engine = server.engine

    def kill_after_first(lines):
        if len(lines) == 1:
            os.kill(engine.process.pid, signal.SIGKILL)
        return False

    lines = _stream_lines(base, PROMPTS[2], 200, kill_after_first)
    assert "the engine process died (exit code -9)" in lines[-2] and lines[-1] == "data: [DONE]", lines[-3:]
    assert not engine._live
    health = httpx.get(f"{base}/health")
    assert health.status_code == 503 and "exit code -9" in health.json()["error"]
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "w5", "max_tokens": 2})
    assert r.status_code == 503
