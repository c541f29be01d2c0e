"""Every script under examples/ (the README's snippets) runs on a CPU as pasted, so none of them can rot
(issue 15.10)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's `sparsespec`
    return env


def test_every_example_is_run_here():
    tested = {"compile_and_inspect.py", "generate.py", "test_my_model.py", "bench.sh", "openai_client.py"}
    assert {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh")} == tested


@pytest.mark.parametrize("name,expect", [("compile_and_inspect.py", "30/30 attention nodes rewritten"),
                                         ("generate.py", "tokens/s, mean accepted")])
def test_python_example(name, expect, capsys, embedded_models_cached):  # both load the embedded SmolLM2
    torch._dynamo.reset()
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    assert expect in out, out
    if name == "generate.py":
        answers = [line for line in out.splitlines() if line.startswith(("[length] '", "[stop] '"))]
        assert len(answers) == 2 and all("''" not in a for a in answers), answers  # non-empty: chat template used
        assert "[stop: '5']" in out  # the streamed count stopped at the stop string


def test_openai_client_example_against_a_live_server(monkeypatch, capsys, word_tokenizer):
    """The README's client, as pasted, against `sparsespec serve` of a tiny model (the embedded one's 30 layers
    would take minutes of CPU here; tests/test_server.py covers the API itself)."""
    from server_fixture import running_server

    from sparsespec_compile import LLM, SparseSpecConfig
    from sparsespec_compile.testing import FAMILIES, tiny_model

    model = tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1), "sdpa")
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=4, min_budget=4, recent=1, page_size=4, num_pages=64,
                                      max_num_seqs=2), tokenizer=word_tokenizer)
    with running_server(llm, model_name="tiny") as (base, _):
        monkeypatch.setenv("SPARSESPEC_URL", f"{base}/v1")
        runpy.run_path(str(EXAMPLES / "openai_client.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].rsplit(" ", 2)[1] in ("length", "stop"), lines  # the chat reply: text, finish reason, tokens
    assert lines[-1] in ("[length]", "[stop]"), lines


def test_users_ci_test_file_passes():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "test_my_model.py")],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 passed" in proc.stdout


def test_benchmark_command(tmp_path):
    cpu = ["--model", "tiny-random", "--device", "cpu", "--batch-sizes", "2", "--output-lens", "8", "--methods",
           "stride0", "pillar", "--compiler", "eager", "--stride", "3", "--min-budget", "6", "--recent", "2",
           "--warmup-tokens", "4", "--out", str(tmp_path)]
    proc = subprocess.run(["bash", str(EXAMPLES / "bench.sh"), *cpu], capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "e2e.json").is_file()


def test_readme_snippets_are_the_examples():
    """A README block that names an example (first line ``# examples/NAME``) is that file, so it runs as pasted."""
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n# examples/(\S+)\n(.*?)```", readme, re.S)
    assert {name for name, _ in blocks} >= {"compile_and_inspect.py", "generate.py", "test_my_model.py",
                                            "openai_client.py"}
    for name, code in blocks:
        assert code.strip() in (EXAMPLES / name).read_text(), f"README's {name} differs from examples/{name}"
    assert "bash examples/bench.sh" in readme
    assert "sparsespec serve\n" in readme and "curl http://127.0.0.1:8000/v1/chat/completions" in readme
