"""Tensor parallelism on CPU: 2 gloo processes under torchrun, HF ``tp_plan="auto"``, the sparsespec runtime.
Greedy outputs equal the single-process model's greedy generate; sampled outputs agree across ranks; the benchmark
runs under torchrun with one process's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import transformers

from sparsespec_compile.testing.tp_worker import MAX_TOKENS, PROMPTS

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}


def torchrun(nproc: int, port: int, *args: str, timeout: int = 600) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_rank_tensor_parallel_matches_one_process(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():  # O(1) activations: greedy decisions far from ties
        torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(tmp_path / "model")
    torchrun(2, 29533, "-m", "sparsespec_compile.testing.tp_worker", str(tmp_path / "model"), str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["tp"] == r1["tp"] == 2
    assert r0["tokens"] == r1["tokens"], "ranks disagree on the generated tokens"
    with torch.no_grad():
        for got, p in zip(r0["tokens"][:3], PROMPTS):
            ref = model.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].tolist()
            assert got == ref
    assert len(r0["tokens"][3]) == MAX_TOKENS and r0["reasons"][3] == "length"


def test_benchmark_under_torchrun_matches_one_process(tmp_path):
    """`sparsespec bench --model DIR` under torchrun: rank 0 writes the JSON, its per-rank floor counts half the KV
    heads, and the greedy tokens equal a one-process run of the same checkpoint."""
    ckpt = tmp_path / "ckpt"
    bench = [sys.executable, "-m", "sparsespec_compile.benchmark"]
    subprocess.run([*bench, "--model", "tiny-random", "--device", "cpu", "--save-model", str(ckpt)], env=ENV,
                   check=True, capture_output=True, timeout=300)
    cell = ["--model", str(ckpt), "--device", "cpu", "--methods", "stride0", "pillar", "--batch-sizes", "2",
            "--output-lens", "16", "--prompt-len", "12", "--temperature", "0", "--stride", "3", "--min-budget", "4",
            "--recent", "2", "--warmup-tokens", "4", "--save-tokens", "--prompts", str(tmp_path / "none.jsonl")]
    one = subprocess.run([*bench, *cell, "--out", str(tmp_path / "one")], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun(2, 29534, "-m", "sparsespec_compile.benchmark", *cell, "--out", str(tmp_path / "two"))
    one, two = (json.loads((tmp_path / d / "e2e.json").read_text()) for d in ("one", "two"))
    assert two["environment"]["world_size"] == 2 and one["environment"]["world_size"] == 1
    assert [r["status"] for r in two["records"]] == ["ok", "ok"]
    for a, b in zip(one["records"], two["records"]):
        assert a["method"] == b["method"] and a["tokens"] == b["tokens"]
    assert two["kv_bytes_per_token"] * 2 == one["kv_bytes_per_token"]
    assert not (tmp_path / "two" / "rank1").exists()
