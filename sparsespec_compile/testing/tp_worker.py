"""One rank of the tensor-parallel check, run under ``torchrun --nproc-per-node N -m
sparsespec_compile.testing.tp_worker MODEL_DIR OUT_DIR [--device cuda]``: load a saved model with HF
``tp_plan="auto"``, generate with the sparsespec runtime, write this rank's outputs to ``OUT_DIR/rank{R}.json``.

Used by ``tests/test_tensor_parallel.py`` (gloo, CPU) and ``bench/gpu_tp_check.py`` (NCCL, one GPU per rank).
The prompts are fixed; the first three are greedy (compared with the single-process model's greedy ``generate``),
the fourth is sampled without a seed, so each rank's generator differs and only the broadcast keeps them agreed.
"""

import argparse
import gc
import json
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.parallel import join_torchrun, tp_from_pretrained_kwargs

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 40))]
MAX_TOKENS = 12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compiler", default="eager", choices=["eager", "inductor"])
    ap.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off", "pad"])
    args = ap.parse_args()
    rank, world, device = join_torchrun(args.device)
    where = tp_from_pretrained_kwargs() if world > 1 else {"device_map": str(device)}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, **where).eval()
    llm = LLM(model, SparseSpecConfig(adaptive=False, stride=3, min_budget=3, recent=1, compiler=args.compiler, num_pages=64,
                                      page_size=4, cuda_graphs=args.cuda_graphs))
    greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    unseeded = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, ignore_eos=True)  # ranks' generators differ
    outs = llm.generate(PROMPTS + PROMPTS[:1], [greedy] * 3 + [unseeded], use_tqdm=False)
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"tokens": [o.token_ids for o in outs], "reasons": [o.finish_reason for o in outs],
                   "world": world, "tp": llm.engine.tp_world,
                   "graph_steps": llm.engine.stats.graph_steps, "steps": llm.engine.stats.steps}, f)
    # The captured graphs hold NCCL work: free them before the communicators go (with them alive,
    # destroy_process_group hung on the H200 pair after a captured run, bench/RESULTS.md).
    del llm
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
