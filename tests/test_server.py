"""``sparsespec serve`` (issue 17): uvicorn on 127.0.0.1, a tiny random Llama and a word-level tokenizer with a chat
template, driven by the real ``openai`` client. Expected outputs: ``LLM.generate`` on the same ``LLM`` before the
server starts (the engine thread owns it afterwards), and each prompt alone through HF ``generate``."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.testing import FAMILIES, hf_greedy, tiny_model

from server_fixture import running_server, wait_until

KEY = "sekret"
MODEL = "tiny-llama"
CONTEXT = 256  # the tiny config's max_position_embeddings


def _text(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


# 32 distinct prompts (the word tokenizer: "w5 w6" -> ids [5, 6]); ids 0-3 are special-ish (w2 is EOS)
PROMPTS = [_text([4 + (7 * i + j * (i % 5 + 1)) % 90 for j in range(3 + i % 9)]) for i in range(32)]
N = 16  # greedy tokens per request
LONG = 60  # max_tokens of the requests that overflow the pool


@pytest.fixture(scope="module")
def served(word_tokenizer):
    model = tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2), "sdpa", seed=0)
    # 8 sequences, a pool of 120 pages of 4 tokens (476 tokens per request at most)
    config = SparseSpecConfig(compiler="eager", stride=4, adaptive=False, min_budget=4, recent=1, page_size=4,
                              num_pages=120, max_num_seqs=8)
    llm = LLM(model, config, tokenizer=word_tokenizer)
    batch = llm.generate(PROMPTS, SamplingParams(max_tokens=N, ignore_eos=True), use_tqdm=False)
    alone = [word_tokenizer.decode(hf_greedy(model, o.prompt_token_ids, N), skip_special_tokens=True) for o in batch]
    assert [o.text for o in batch] == alone
    chat = llm.chat([{"role": "user", "content": PROMPTS[3]}], SamplingParams(max_tokens=12), use_tqdm=False)[0]
    overflow = llm.generate(PROMPTS[:12], SamplingParams(max_tokens=LONG, ignore_eos=True), use_tqdm=False)
    seeded = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7,
                                                      ignore_eos=True), use_tqdm=False)
    logprobs = llm.generate(PROMPTS[5], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2), use_tqdm=False)[0]
    refs = dict(batch=batch, alone=alone, chat=chat, overflow=overflow, seeded=seeded, logprobs=logprobs)
    with running_server(llm, model_name=MODEL, api_key=KEY) as (base, server):
        yield base, server, refs


def _client(base, **kw):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, **kw)


def _aclient(base):
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


def _pages_free(server) -> bool:
    alloc = server.engine.llm.engine.scheduler.allocator
    return alloc.num_free == alloc.num_blocks



def test_completions_whole_and_streamed_equal_generate(served):
    base, _, refs = served
    c = _client(base)
    for i in (0, 7):
        want = refs["batch"][i]
        whole = c.completions.create(model=MODEL, prompt=PROMPTS[i], extra_body={"ignore_eos": True},
                                     max_tokens=N, temperature=0)
        assert whole.choices[0].text == want.text and whole.choices[0].finish_reason == "length"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(want.prompt_token_ids), N)
        chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[i], extra_body={"ignore_eos": True},
                                           max_tokens=N, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2  # streamed, not one lump
    ids = c.completions.create(model=MODEL, prompt=refs["batch"][1].prompt_token_ids, max_tokens=N,
                               temperature=0, extra_body={"ignore_eos": True})  # a prompt of token ids
    assert ids.choices[0].text == refs["batch"][1].text


def test_chat_whole_and_streamed_equal_llm_chat(served):
    base, _, refs = served
    c = _client(base)
    msgs = [{"role": "user", "content": PROMPTS[3]}]
    whole = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == refs["chat"].text and whole.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == refs["chat"].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(refs["chat"].token_ids)


def test_32_concurrent_streams_get_what_they_get_alone(served):
    base, server, refs = served

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in stream])

    async def main():
        client = _aclient(base)
        return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    assert asyncio.run(main()) == refs["alone"]  # 32 clients, 8 sequences: 24 queue
    wait_until(lambda: _pages_free(server))


def test_a_request_joins_the_running_batch(served):
    """Continuous batching: a short request sent while a long one streams finishes first."""
    base, _, _ = served
    order = []

    async def long():
        client = _aclient(base)
        stream = await client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=LONG, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        started = False
        async for _ in stream:
            if not started:
                started = True
                asyncio.get_running_loop().create_task(short(client))
        order.append("long")

    async def short(client):
        await client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3, temperature=0)
        order.append("short")

    async def main():
        await long()
        while len(order) < 2:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert order == ["short", "long"]


def test_a_client_that_disconnects_frees_its_pages(served):
    base, server, refs = served
    engine = server.engine

    async def full(client, i):
        out = await client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=LONG, temperature=0,
                                              extra_body={"ignore_eos": True})
        return out.choices[0].text

    async def quitter():
        body = {"model": MODEL, "prompt": PROMPTS[9], "max_tokens": 200, "stream": True, "ignore_eos": True}
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
            async with h.stream("POST", f"{base}/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = 0
                async for line in resp.aiter_lines():
                    lines += line.startswith("data:")
                    if lines == 3:
                        break  # leaving the block closes the connection mid-stream

    async def main():
        client = _aclient(base)
        others = [asyncio.ensure_future(full(client, i)) for i in range(3)]
        await quitter()
        return await asyncio.gather(*others)

    aborted_before = _finished_count(base, "abort")
    texts = asyncio.run(main())
    assert texts == [o.text for o in refs["overflow"][:3]]  # the others finish, untouched
    wait_until(lambda: _finished_count(base, "abort") == aborted_before + 1)
    wait_until(lambda: _pages_free(server) and not engine._live)


def test_a_client_that_gives_up_on_a_whole_response_frees_its_pages(served):
    base, server, _ = served
    aborted_before = _finished_count(base, "abort")
    body = {"model": MODEL, "prompt": PROMPTS[6], "max_tokens": CONTEXT - 16, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client closes the connection while the server generates
        httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    wait_until(lambda: _finished_count(base, "abort") == aborted_before + 1)
    wait_until(lambda: _pages_free(server) and not server.engine._live)


def _finished_count(base, reason) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        if fam.name == "sparsespec_request_finished":
            return sum(s.value for s in fam.samples if s.name.endswith("_total")
                       and s.labels.get("finish_reason") == reason)
    return 0.0


def test_more_requests_than_the_pool_holds_queue_and_finish(served):
    base, server, refs = served
    need = sum(-(-(len(o.prompt_token_ids) + LONG) // 4) for o in refs["overflow"])
    assert need > server.engine.llm.engine.scheduler.allocator.num_blocks  # 12 requests, more pages than the pool has

    async def one(client, p):
        out = await client.completions.create(model=MODEL, prompt=p, max_tokens=LONG, temperature=0,
                                              extra_body={"ignore_eos": True})
        return out.choices[0].text, out.choices[0].finish_reason

    async def main():
        client = _aclient(base)
        return await asyncio.gather(*(one(client, p) for p in PROMPTS[:12]))

    assert asyncio.run(main()) == [(o.text, "length") for o in refs["overflow"]]
    wait_until(lambda: _pages_free(server))


def test_stop_strings_end_the_output_there(served):
    base, _, refs = served
    c = _client(base)
    ref = refs["batch"][4]
    stop = _text(ref.token_ids[9:11])  # two tokens: completes mid-output, possibly inside an accepted run
    text = ref.text[: ref.text.index(stop)]
    whole = c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=N, temperature=0, stop=[stop, "w999"],
                                 extra_body={"ignore_eos": True})
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (text, "stop")
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=N, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == text and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_and_logprobs_equal_generate(served):
    base, _, refs = served
    c = _client(base)
    for i, want in enumerate(refs["seeded"]):
        out = c.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=16, temperature=0.9, top_p=0.9, seed=7,
                                   extra_body={"ignore_eos": True})
        assert out.choices[0].text == want.text
    want = refs["logprobs"]
    out = c.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0, logprobs=2,
                               extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert lp.tokens == [f"w{t}" for t in want.token_ids]
    assert lp.token_logprobs == pytest.approx([d[t] for d, t in zip(want.logprobs, want.token_ids)])
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w5"}], max_tokens=3,
                                     temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


LONG_PROMPT = _text([5] * (CONTEXT + 4))


@pytest.mark.parametrize("kw,param", [
    (dict(max_tokens=-3), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1), "temperature"),
    (dict(prompt=LONG_PROMPT), "prompt"),
    (dict(max_tokens=CONTEXT), "max_tokens"),  # prompt + max_tokens over the context
    (dict(model="gpt-4"), "model"),
    (dict(n=2), "n"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(prompt=[5, 96]), "prompt"),  # a token id outside the vocabulary
])
def test_bad_completion_requests_are_400_naming_the_field(served, kw, param):
    base, _, _ = served
    args = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=4) | kw
    with pytest.raises(openai.BadRequestError) as info:
        _client(base).completions.create(**args)
    err = info.value.response.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err


@pytest.mark.parametrize("kw,param", [
    (dict(messages=[{"role": "user", "content": LONG_PROMPT}]), "messages"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "wizard", "content": "w5"}]), "messages.0.role"),
    (dict(max_completion_tokens=0), "max_completion_tokens"),
    (dict(n=3), "n"),
])
def test_bad_chat_requests_are_400_naming_the_field(served, kw, param):
    base, _, _ = served
    args = dict(model=MODEL, messages=[{"role": "user", "content": "w5"}], max_tokens=4) | kw
    with pytest.raises(openai.BadRequestError) as info:
        _client(base).chat.completions.create(**args)
    assert info.value.response.json()["error"]["param"] == param


def test_api_key_is_required_on_v1(served):
    base, _, _ = served
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/completions",
                                                                  {"model": MODEL, "prompt": "w5"}),
                                   ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []})):
            r = httpx.request(method, f"{base}{path}", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in _client(base).models.list().data] == [MODEL]
    assert _client(base).models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{base}/health").status_code == 200  # open: load balancers probe it without a key


def test_metrics_are_prometheus_text(served):
    from prometheus_client.parser import text_string_to_metric_families

    base, _, _ = served
    _client(base).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    time.sleep(0.6)  # the engine samples its state every 0.5 s
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
    for name in ("sparsespec_num_requests_running", "sparsespec_num_requests_waiting", "sparsespec_kv_pages_used",
                 "sparsespec_kv_pages_total", "sparsespec_generation_tokens_per_second",
                 "sparsespec_mean_accepted_length", "sparsespec_acceptance_rate", "sparsespec_stride_mean_chosen",
                 "sparsespec_generation_tokens", "sparsespec_time_to_first_token_seconds",
                 "sparsespec_inter_token_latency_seconds"):
        assert name in fams, name
    value = {s.name: s.value for f in fams.values() for s in f.samples if not s.labels.keys() - {"model_name"}}
    assert value["sparsespec_kv_pages_total"] == 120 and value["sparsespec_stride"] == 4
    assert value["sparsespec_generation_tokens_total"] >= 12
    # what bench/serve_load.py reads to tell a server-bound load from a client-bound one
    assert value["sparsespec_engine_steps_run_total"] > 0 and value["sparsespec_engine_step_seconds_total"] > 0
    assert 0 < value["sparsespec_engine_thread_cpu_seconds"] <= value["process_cpu_seconds_total"]
    # one-offs inside served steps, after the warm-up's reset: no graphs on the CPU, no compile after warm-up
    assert value["sparsespec_engine_graph_capture_seconds"] == 0 and value["sparsespec_engine_compile_seconds"] >= 0
    positions = {s.labels["position"] for s in fams["sparsespec_acceptance_rate"].samples}
    assert positions == {"1", "2", "3", "4"}


def test_a_broken_engine_fails_every_request_and_health(word_tokenizer, monkeypatch):
    """A step loop that raises (a bug, not a bad request) ends every live request with an error, /health says so,
    and later requests are refused at once: nothing waits forever."""
    model = tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1), "sdpa", seed=1)
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=2, min_budget=4, page_size=4, num_pages=32,
                                      max_num_seqs=2), tokenizer=word_tokenizer)
    with running_server(llm, model_name=MODEL, api_key=KEY, warmup=False) as (base, _):
        def broken():
            raise RuntimeError("scheduler invariant broken")

        monkeypatch.setattr(llm, "step", broken)
        c = _client(base)
        with pytest.raises(openai.APIStatusError) as info:
            c.completions.create(model=MODEL, prompt="w5 w6", max_tokens=4)
        assert info.value.status_code == 503 and "scheduler invariant broken" in info.value.message
        assert httpx.get(f"{base}/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as info:
            c.completions.create(model=MODEL, prompt="w5 w6", max_tokens=4, stream=True)
        assert info.value.status_code == 503
