"""Tensor parallelism on CPU: 2 gloo processes under torchrun, HF ``tp_plan="auto"``, the sparsespec runtime.
Greedy outputs equal the single-process model's greedy generate; sampled outputs agree across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

WORKER = Path(__file__).with_name("tp_worker.py")


def test_two_rank_tensor_parallel_matches_one_process(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():  # O(1) activations: greedy decisions far from ties
        torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           str(WORKER), str(tmp_path / "model"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["tp"] == r1["tp"] == 2
    assert r0["tokens"] == r1["tokens"], "ranks disagree on the generated tokens"
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 40))]
    with torch.no_grad():
        for got, p in zip(r0["tokens"][:3], prompts):
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].tolist()
            assert got == ref
    assert len(r0["tokens"][3]) == 12 and r0["reasons"][3] == "length"
