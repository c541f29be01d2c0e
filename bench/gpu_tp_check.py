"""Tensor parallelism on the GPUs of one host (NCCL): the sparsespec runtime on an HF ``tp_plan="auto"`` model
gives the single-process model's greedy tokens, and the ranks agree on sampled ones.

    python3 bench/gpu_tp_check.py --out $OUT [--gpus 2] [--runs llama:off llama:on qwen3:off qwen3:on]

Tiny fp32 models (O(1) weights: greedy argmaxes far from ties) are saved; each one's HF greedy ``generate`` on
one GPU is the reference, and ``sparsespec_compile.testing.tp_worker`` runs under ``torchrun --nproc-per-node
GPUS`` with NCCL and Inductor, with CUDA graphs off (the TP default) or captured (``cuda_graphs="on"``: the
all-reduces inside the graph). Qwen3 is there because transformers 5.17's plan hooks its q/k norms (the runtime
drops those backward hooks). Writes ``tp_check.json``; exits 1 when a run fails or disagrees.
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

# head_dim 64 (what the Triton kernels are tuned and tested for), one KV head per rank at 2 GPUs
SHAPE = dict(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {"llama": lambda: transformers.LlamaConfig(**SHAPE),
           "qwen3": lambda: transformers.Qwen3Config(**SHAPE, head_dim=64, tie_word_embeddings=False)}


def save_model(name: str, path: Path) -> list[list[int]]:
    """Save the tiny model; its HF greedy tokens on one GPU for PROMPTS."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(path)
    model = model.cuda()
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=MAX_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    del model
    torch.cuda.empty_cache()
    return ref


def tail(text) -> str:
    text = text or ""
    return (text.decode(errors="replace") if isinstance(text, bytes) else text)[-2500:]


def run_tp(model_dir: Path, out: Path, gpus: int, graphs: str, timeout: float) -> dict:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "-m",
           "sparsespec_compile.testing.tp_worker", str(model_dir), str(out), "--device", "cuda",
           "--compiler", "inductor", "--cuda-graphs", graphs]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        run: dict = {"returncode": proc.returncode}
        if proc.returncode:
            run["stderr_tail"] = tail(proc.stderr)
    except subprocess.TimeoutExpired as exc:  # the ranks write their results before tearing NCCL down
        run = {"returncode": "timeout", "stderr_tail": tail(exc.stderr)}
    if all((out / f"rank{r}.json").exists() for r in range(gpus)):
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(gpus)]
        run.update(tp=[r["tp"] for r in ranks], steps=ranks[0]["steps"], graph_steps=ranks[0]["graph_steps"],
                   ranks_agree=all(r["tokens"] == ranks[0]["tokens"] for r in ranks), tokens=ranks[0]["tokens"])
    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--runs", nargs="+", default=["llama:off", "llama:on", "qwen3:off", "qwen3:on"],
                    help="MODEL:GRAPHS pairs, MODEL in %s, GRAPHS off or on" % sorted(CONFIGS))
    ap.add_argument("--timeout", type=float, default=150, help="seconds per torchrun")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tp_check_"))
    report: dict = {"gpus": args.gpus, "transformers": transformers.__version__, "reference": {}, "runs": {}}
    ok = True
    for spec in args.runs:
        name, graphs = spec.split(":")
        if name not in report["reference"]:
            report["reference"][name] = save_model(name, tmp / name)
        run = run_tp(tmp / name, tmp / spec.replace(":", "_"), args.gpus, graphs, args.timeout)
        if "tokens" in run:
            run["greedy_equal_to_hf"] = [t == e for t, e in zip(run["tokens"][:3], report["reference"][name])]
        ok &= (run["returncode"] == 0 and run.get("ranks_agree", False) and all(run.get("greedy_equal_to_hf", [0]))
               and run.get("tp") == [args.gpus] * args.gpus)
        report["runs"][spec] = run
        print(spec, {k: v for k, v in run.items() if k not in ("tokens", "stderr_tail")}, flush=True)
        if run["returncode"] != 0:
            print(run.get("stderr_tail", "")[-800:], flush=True)
        (args.out / "tp_check.json").write_text(json.dumps({**report, "ok": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
