"""What users of vLLM / HF expect from ``LLM``: stop strings exact under speculation, streaming, ``chat``,
``LLM("path/to/model")``, ``stats(reset=True)`` without compile time (issue 15, "expected")."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.testing import FAMILIES, hf_greedy, tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 41)), [12, 13]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2), "sdpa", seed=0)


def _llm(model, tok, stride, **config):
    return LLM(model, SparseSpecConfig(compiler="eager", stride=stride, min_budget=4, recent=1, page_size=4,
                                       num_pages=120, max_num_seqs=4, **config), tokenizer=tok)


def _expected(tok, ref, stop):
    """Plain decoding with a stop string: the first n tokens whose text holds it, the text cut before it."""
    n = next(n for n in range(1, len(ref) + 1) if stop in tok.decode(ref[:n]))
    text = tok.decode(ref[:n])
    return ref[:n], text[: text.index(stop)]


def test_stop_strings_are_exact_under_speculation(model, word_tokenizer):
    refs = [hf_greedy(model, p, 24) for p in PROMPTS]
    # a stop string per prompt that first completes mid-output (and may span two tokens)
    stops = [word_tokenizer.decode(ref[9:11]) for ref in refs]
    want = [_expected(word_tokenizer, ref, stop) for ref, stop in zip(refs, stops)]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop, "never there"]) for stop in stops]
    for stride in (4, 0):
        outs = _llm(model, word_tokenizer, stride).generate(PROMPTS, params, use_tqdm=False)
        for out, (ids, text), stop in zip(outs, want, stops):
            assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == (ids, text, "stop", stop)


def test_sampled_stop_strings_equal_at_every_stride(model, word_tokenizer):
    """Seeded sampling emits the target's own sample at each position, so speculation changes nothing, stop
    strings included."""
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True, stop=["w7", "w1"])
    outs = {k: _llm(model, word_tokenizer, k).generate(PROMPTS, params, use_tqdm=False) for k in (0, 4)}
    assert [(o.token_ids, o.text) for o in outs[0]] == [(o.token_ids, o.text) for o in outs[4]]
    assert any(o.finish_reason == "stop" for o in outs[4])


def test_streaming_adds_up_to_the_outputs(model, word_tokenizer):
    llm = _llm(model, word_tokenizer, 3)
    refs = [hf_greedy(model, p, 20) for p in PROMPTS]
    stops = [word_tokenizer.decode(refs[0][7:8]), word_tokenizer.decode(refs[1][5:7])]  # one token, two tokens
    params = SamplingParams(max_tokens=20, ignore_eos=True, stop=stops)
    ids: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    final = {}
    for ev in llm.generate_stream(PROMPTS, params):
        assert ev.index not in final, "an event after the prompt's last one"
        ids.setdefault(ev.index, []).extend(ev.token_ids)
        text[ev.index] = text.get(ev.index, "") + ev.text
        if ev.finished:
            final[ev.index] = ev.output
    assert sorted(final) == [0, 1, 2]
    want = llm.generate(PROMPTS, params, use_tqdm=False)
    assert sum(o.finish_reason == "stop" for o in want) >= 2
    for i, out in enumerate(want):
        assert (ids[i], text[i]) == (out.token_ids, out.text) == (final[i].token_ids, final[i].text)


def test_leaving_a_stream_early_aborts_its_requests(model, word_tokenizer):
    llm = _llm(model, word_tokenizer, 3)
    for ev in llm.generate_stream(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True)):
        break
    assert not llm.engine.has_unfinished()
    assert llm.generate([PROMPTS[0]], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)[0].token_ids \
        == hf_greedy(model, PROMPTS[0], 6)


def test_chat(model, word_tokenizer):
    llm = _llm(model, word_tokenizer, 3)
    conv = [{"role": "user", "content": "w5 w6 w7"}]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    (one,) = llm.chat(conv, params, use_tqdm=False)
    assert one.prompt_token_ids == [5, 6, 7, 1] and one.token_ids == hf_greedy(model, [5, 6, 7, 1], 6)
    assert [o.token_ids for o in llm.chat([conv, conv], params, use_tqdm=False)] == [one.token_ids] * 2
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"text": "hi"}])


def test_llm_from_a_directory(model, word_tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), SparseSpecConfig(compiler="eager", stride=2, min_budget=4, num_pages=64))
    (out,) = llm.generate(["w5 w6 w7"], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert out.token_ids == hf_greedy(model, [5, 6, 7], 6) and out.text == word_tokenizer.decode(out.token_ids)
    with pytest.raises(ValueError, match="no such directory"):
        LLM(str(tmp_path / "missing"))


def test_stats_reset_and_compile_time(model):
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=2, min_budget=4, num_pages=64))
    torch._dynamo.reset()  # (LLM() compiled the graph; dropped here, the first step compiles it again)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    llm.generate(PROMPTS[:2], params, use_tqdm=False)
    first = llm.stats(reset=True)
    assert first["output_tokens"] == 16 and first["compile_steps"] >= 1 and first["compile_seconds"] > 0
    assert llm.stats()["steps"] == 0 and llm.stats()["output_tokens"] == 0  # reset
    llm.generate(PROMPTS[:2], params, use_tqdm=False)
    second = llm.stats()
    assert second["output_tokens"] == 16 and second["compile_steps"] == 0 and second["compile_seconds"] == 0
    assert second["tokens_per_s"] == pytest.approx(16 / second["seconds"])


def test_logprobs_of_the_returned_tokens(model, word_tokenizer):
    """Each returned token's log-prob under the model's own distribution at its position (what plain decoding
    sampled it from; never the draft's), with the top alternatives; cut with the tokens at a stop."""
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3, stop=["w33"])
    for stride, overlap in ((3, False), (0, False), (3, True), (0, True)):  # overlap: results read a step later
        outs = _llm(model, word_tokenizer, stride, overlap=overlap).generate(PROMPTS, params, use_tqdm=False)
        for prompt, out in zip(PROMPTS, outs):
            assert len(out.logprobs) == len(out.token_ids) > 0
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([prompt + out.token_ids])).logits[0].float(), -1)
            for t, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
                row = ref[len(prompt) - 1 + t]
                assert next(iter(lp)) == tok and lp[tok] == pytest.approx(row[tok].item(), abs=1e-4)
                top = row.topk(3)
                assert set(lp) - {tok} <= set(top.indices.tolist()) and len(set(lp) | {tok}) >= 3
    assert SamplingParams().logprobs is None
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)
