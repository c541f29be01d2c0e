"""The command line a new user meets first (issue 15.6): flags checked before the model loads, paths checked before
anything reaches the hub client, the exit code says whether the requests succeeded, every flag has help."""

from __future__ import annotations

import argparse

import pytest
import torch

from sparsespec_compile import cli
from sparsespec_compile.testing import FAMILIES, tiny_model

VOCAB = [f"w{i}" for i in range(96)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama checkpoint with a word-level tokenizer (no chat template), as `from_pretrained` reads it."""
    from word_tokenizer import make_word_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama-dir")
    tiny_model(FAMILIES["llama"].config(layers=1, heads=2, kv_heads=1), "sdpa").save_pretrained(path)
    make_word_tokenizer(chat=False).save_pretrained(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(cli, "_load", fail)


@pytest.mark.parametrize("flags,msg", [(["--max-tokens", "0"], "max_tokens must be an int >= 1"),
                                       (["--stride", "-1"], "stride=-1"),
                                       (["--top-p", "0"], "top_p must be in"),
                                       (["--sparsity", "2"], "sparsity=2.0")])
def test_bad_flags_are_reported_before_loading(flags, msg, no_model_loading):
    with pytest.raises(SystemExit, match=msg):
        cli.main(["generate", "hi", *flags])


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no such directory"):
        cli.main(["inspect", "--model", str(tmp_path / "nope")])


def test_generate_has_no_config_flag(capsys):
    with pytest.raises(SystemExit) as info:  # a config has no tokenizer: text prompts could never work
        cli.main(["generate", "--config", "x.json"])
    assert info.value.code == 2 and "unrecognized arguments: --config" in capsys.readouterr().err


def test_inspect_needs_no_tokenizer(model_dir, tmp_path, capsys):
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for f in ("config.json", "model.safetensors"):
        (weights_only / f).write_bytes((model_dir / f).read_bytes())
    assert cli.main(["inspect", "--model", str(weights_only)]) == 0
    assert "1/1 layers" in capsys.readouterr().out


def test_generate_exit_code_and_stats(model_dir, capsys):
    torch._dynamo.reset()
    ok = ["generate", "--model", str(model_dir), "w5 w6 w7", "--max-tokens", "4", "--stride", "2",
          "--min-budget", "2", "--no-progress", "--seed", "3", "--temperature", "0.7", "--top-p", "0.9",
          "--draft", "hybrid"]
    assert cli.main(ok) == 0  # no chat template in this tokenizer: prompts go in as they are
    out = capsys.readouterr().out
    assert "[length]" in out and "tokens/s" in out and "compiled a graph left out" in out and "{'" not in out
    assert "(hybrid drafts)" in out  # (the adaptive stride decodes plainly on a CPU: no scored cycle to show recall)
    too_long = " ".join(VOCAB[5:] * 3)  # 273 tokens > max_position_embeddings 256: the request fails
    assert cli.main(["generate", "--model", str(model_dir), too_long, "--max-tokens", "4", "--no-progress"]) == 1
    assert "1 of 1 request(s) failed" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no chat template"):
        cli.main(["generate", "--model", str(model_dir), "w5", "--chat-template"])


def test_every_flag_has_help():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("demo", "generate", "inspect", "check"):
        for action in subs.choices[name]._actions:
            assert action.help, f"sparsespec {name} {action.option_strings or action.dest} has no help text"


def test_bench_help_describes_the_benchmark(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "End-to-end benchmark" in out and "Modules:" not in out and "The benchmark driver" not in out


def test_generate_sizes_the_pool_from_the_prompts(model_dir, monkeypatch):
    """Issue 15.1: `generate` peaked at 12.9 GB RSS (a pool of half the machine's memory); now what the prompts can
    need, or --num-pages."""
    import sparsespec_compile

    seen = []

    class Stop(Exception):
        pass

    def spy(model, config, tokenizer=None):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(sparsespec_compile, "LLM", spy)
    base = ["generate", "--model", str(model_dir), "w5 w6 w7", " ".join(VOCAB[3:40]), "--max-tokens", "20",
            "--stride", "4"]
    for extra in ([], ["--num-pages", "7"]):
        with pytest.raises(Stop):
            cli.main(base + extra)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tok(p)["input_ids"]) for p in base[3:5]]
    # each prompt + 20 new tokens + one verify chunk (stride + 1 = 5), in pages of 16
    assert seen[0].num_pages == sum(-(-(n + 20 + 5) // 16) for n in lengths) and seen[0].max_num_seqs == 2
    assert seen[0].num_pages < 20 and seen[1].num_pages == 7


def test_generate_names_an_embedded_model(monkeypatch):
    """`--model gemma3` (or smollm2) loads the embedded model by name, not a directory of that name."""
    import sparsespec_compile.models as models

    class Stop(Exception):
        pass

    seen = []

    def stub(**kw):
        seen.append(kw)
        raise Stop

    monkeypatch.setitem(models.EMBEDDED, "gemma3", stub)
    with pytest.raises(Stop):
        cli.main(["generate", "--model", "gemma3", "hi", "--draft", "hybrid"])
    assert seen == [{"attn": "sdpa"}]
