"""``bench/serve_load.py`` (the issue-17 load generator) runs on a CPU: a tiny model directory, a server already
running in this process (``--server-url``: no second interpreter to start), the offline ``LLM.generate`` on the same
requests, the JSON report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


from server_fixture import running_server

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
SERVE_ARGS = ["--compiler", "eager", "--stride", "4", "--no-adaptive", "--min-budget", "4", "--num-pages", "64",
              "--max-num-seqs", "4", "--option", "page_size=4", "--option", "recent=1", "--no-warmup"]


def _script():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_generator_reports_server_and_offline(tmp_path):
    from word_tokenizer import make_word_tokenizer

    from sparsespec_compile import cli
    from sparsespec_compile.testing import FAMILIES, tiny_model

    model_dir = tmp_path / "model"
    tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1), "sdpa").save_pretrained(model_dir)
    make_word_tokenizer(chat=True).save_pretrained(model_dir)
    prompts = tmp_path / "gsm8k.jsonl"
    prompts.write_text("".join(json.dumps({"question": " ".join(f"w{5 + i + j}" for j in range(3 + i)),
                                           "answer": "#### 1"}) + "\n" for i in range(3)))
    ns = cli.build_parser().parse_args(["serve", str(model_dir), *SERVE_ARGS])
    llm, _ = cli.load_served(ns, cli.serve_config(ns))  # what `sparsespec serve DIR SERVE_ARGS` would serve
    out = tmp_path / "out"
    with running_server(llm, model_name="bench", warmup=False) as (base, _):
        rc = _script().main(["--server-url", base, "--model-dir", str(model_dir), "--prompts", str(prompts),
                             "--num-requests", "5", "--concurrency", "3", "--max-tokens", "6", "--out", str(out),
                             "--client-procs", "2", "--", *SERVE_ARGS])
    assert rc == 0
    r = json.loads((out / "serve_load.json").read_text())
    s = r["server"]
    assert (s["completed"], s["output_tokens"], s["num_errors"]) == (5, 30, 0) and s["finish_reasons"] == ["length"]
    assert s["tokens_per_s"] > 0 and s["ttft_ms"]["n"] == 5 and s["itl_ms"]["p50"] >= 0 and s["tpot_ms"]["p99"] > 0
    assert s["metrics"]["sparsespec_generation_tokens_total"] == 30
    # the clients came from two processes (3 in flight: 2 + 1); the server's window counts the steps it ran for them
    c, w = s["client"], s["window"]
    assert c["procs"] == 2 and c["chunks"] >= 5 and c["cpu_us_per_chunk"] > 0 and c["cpu_per_wall_max"] > 0
    assert c["bound"] in ("client", "server")
    assert w["engine_steps"] > 0 and w["engine_step_ms"] > 0 and 0 < w["engine_step_busy"] <= 1
    assert w["tokens_per_s"] > 0 and w["process_cpu_per_wall"] > 0 and r["engine_step_slowdown"] > 0
    assert r["offline"]["output_tokens"] == 30 and r["offline"]["failed"] == 0 and r["server_over_offline"] > 0


def test_offline_generate_decodes_each_output_once(word_tokenizer, monkeypatch):
    """The offline side of the comparison: ``LLM.generate`` decodes an output once, when it finishes, not at every
    step (``generate_stream``, which streams text, still does)."""
    from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
    from sparsespec_compile.testing import FAMILIES, tiny_model

    model = tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1), "sdpa")
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=2, min_budget=4, page_size=4, num_pages=64,
                                      max_num_seqs=4), tokenizer=word_tokenizer)
    calls = []
    decode = word_tokenizer.decode
    monkeypatch.setattr(word_tokenizer, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = llm.generate(["w5 w6", "w7 w8 w9", "w10"], params, use_tqdm=False)
    assert len(calls) == 3
    streamed = [ev for ev in llm.generate_stream(["w5 w6", "w7 w8 w9", "w10"], params)]
    assert len(calls) > 3 + 3  # the streamed text of running requests
    assert [o.text for o in outs] == ["".join(ev.text for ev in streamed if ev.index == i) for i in range(3)]
