"""``sparsespec serve`` as a user runs it: flags checked before the model loads, then the real command in its own
process on a tiny model directory, one request through the openai client, and a clean Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_fixture import free_port

from sparsespec_compile import cli


@pytest.fixture
def no_model_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(cli, "load_served", fail)


@pytest.mark.parametrize("flags,msg", [(["--stride", "-1"], "stride=-1"),
                                       (["--stream-interval", "0"], "--stream-interval 0"),
                                       (["--max-num-seqs", "0"], "max_num_seqs=0"),
                                       (["--option", "nonsense=1"], "unknown sparsespec option"),
                                       (["--option", "cuda_graphs=sometimes"], "cuda_graphs"),
                                       (["--port", "70000"], "not a TCP port"),
                                       (["/no/such/model"], "not a Hugging Face model directory")])
def test_bad_serve_flags_are_reported_before_loading(flags, msg, no_model_loading):
    with pytest.raises(SystemExit, match=msg):
        cli.main(["serve", *flags])


def test_serve_command_serves_and_stops_on_ctrl_c(tmp_path):
    from word_tokenizer import make_word_tokenizer

    from sparsespec_compile.testing import FAMILIES, tiny_model

    model_dir = tmp_path / "tiny"
    tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1), "sdpa").save_pretrained(model_dir)
    make_word_tokenizer(chat=True).save_pretrained(model_dir)
    port = free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               SPARSESPEC_API_KEY="k3y")
    proc = subprocess.Popen(["sparsespec", "serve", str(model_dir), "--port", str(port), "--compiler", "eager",
                             "--stride", "3", "--num-pages", "64", "--max-num-seqs", "2", "--option", "page_size=4",
                             "--option", "min_budget=4", "--stream-interval", "3", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(model_dir)]  # named as given
        out = client.chat.completions.create(model=str(model_dir), messages=[{"role": "user", "content": "w5 w6"}],
                                             max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5 and out.choices[0].message.content
        assert httpx.get(f"{base}/v1/models").status_code == 401  # $SPARSESPEC_API_KEY is honoured
        args = dict(model=str(model_dir), prompt="w7 w8 w9", max_tokens=12, temperature=0,
                    extra_body={"ignore_eos": True})
        whole = client.completions.create(**args).choices[0].text
        chunks = [c.choices[0].text for c in client.completions.create(**args, stream=True)]
        assert "".join(chunks) == whole
        words = [len(c.split()) for c in chunks if c.strip()]
        assert words[0] == 1 and min(words[1:-1], default=3) >= 3, chunks  # --stream-interval 3
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert f"on http://127.0.0.1:{port}/v1 (stride 3, 64 KV pages of 4 tokens, 2 sequences, offload off)" in output
