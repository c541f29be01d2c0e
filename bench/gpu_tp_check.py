"""Tensor parallelism on the GPUs of one host (NCCL): the sparsespec runtime on an HF ``tp_plan="auto"`` model
gives the single-process model's greedy tokens, and the ranks agree on sampled ones.

    python3 bench/gpu_tp_check.py --out $OUT [--gpus 2]

A tiny fp32 Llama (O(1) weights: greedy argmaxes far from ties) is saved, its HF greedy ``generate`` on one GPU is
the reference, and ``sparsespec_compile.testing.tp_worker`` runs under ``torchrun --nproc-per-node GPUS`` with
NCCL and Inductor: once with CUDA graphs off (the TP default) and once captured (``cuda_graphs="on"``: the
all-reduces inside the graph). Writes ``tp_check.json``; exits 1 when a run fails or disagrees.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from sparsespec_compile.testing.tp_worker import MAX_TOKENS, PROMPTS


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tp_check_"))
    torch.manual_seed(0)
    # head_dim 64 (what the Triton kernels are tuned and tested for), one KV head per rank at 2 GPUs
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(tmp / "model")
    model = model.cuda()
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=MAX_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    del model
    torch.cuda.empty_cache()
    report = {"gpus": args.gpus, "reference": ref, "runs": {}}
    ok = True
    for graphs in ("off", "on"):
        out = tmp / f"graphs_{graphs}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.gpus), "-m",
               "sparsespec_compile.testing.tp_worker", str(tmp / "model"), str(out), "--device", "cuda",
               "--compiler", "inductor", "--cuda-graphs", graphs]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        run: dict = {"returncode": proc.returncode}
        if proc.returncode:
            run["stderr_tail"] = proc.stderr[-2500:]
            ok = False
        else:
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.gpus)]
            run.update(
                tp=[r["tp"] for r in ranks], steps=ranks[0]["steps"], graph_steps=ranks[0]["graph_steps"],
                ranks_agree=all(r["tokens"] == ranks[0]["tokens"] for r in ranks),
                greedy_equal_to_hf=[t == e for t, e in zip(ranks[0]["tokens"][:3], ref)],
                tokens=ranks[0]["tokens"],
            )
            ok &= run["ranks_agree"] and all(run["greedy_equal_to_hf"]) and run["tp"] == [args.gpus] * args.gpus
        report["runs"][graphs] = run
        print(graphs, {k: v for k, v in run.items() if k != "tokens"}, flush=True)
    report["ok"] = ok
    (args.out / "tp_check.json").write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
