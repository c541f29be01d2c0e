"""The command line of ``sparsespec bench``: its flags, their defaults and checks (run.py runs what they ask)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .common import DEFAULT_PROMPTS, METHODS
from .models import MODEL_NAMES


def _split(text: str) -> str | float:
    return text if text in ("request", "layer") else float(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    # the package docstring is the user-facing one (this module's says what the file holds); its "Modules:" part
    # is for readers of the code
    user_doc = (sys.modules[__package__].__doc__ or "").split("\nModules:")[0].strip()
    ap = argparse.ArgumentParser(prog="sparsespec bench", description=user_doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2",
                    help=f"one of {', '.join(MODEL_NAMES)}, or a directory with an HF checkpoint (under torchrun "
                         "it is loaded with tp_plan='auto': tensor parallel, one process per GPU)")
    ap.add_argument("--save-model", type=Path, default=None,
                    help="save the built model as an HF checkpoint in this directory and exit (build a random model "
                         "once, then load it under torchrun with --model DIR)")
    ap.add_argument("--gguf", default=None, help="the named model's GGUF: a file, or for gemma3 also the folder of "
                    "its gemma-3-270m-q4_k_m.gguf.part0* pieces (default: the installed model packages')")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on the GPU, float32 on the CPU")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help="default: all (hf_static_compile only on the GPU)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--kv-pool-fraction", type=float, default=1.0,
                    help="device KV pool as a share of the batch's whole-context demand: 1.0 = nothing is ever "
                         "offloaded; 0.5 = 2x oversubscription (requests are offloaded to the host pool and "
                         "restored, never recomputed while the host pool has room)")
    ap.add_argument("--requests-per-slot", type=int, default=1,
                    help="requests per batch slot (the runtime's max_num_seqs = batch): 1 = a closed batch that "
                         "drains as requests finish; 2+ keeps the slots filled from a queue (continuous batching, "
                         "what a server sees). HF runs the first `batch` prompts only")
    ap.add_argument("--output-lens", nargs="+", type=int, default=[1024],
                    help="tokens generated per request (the context-length axis)")
    ap.add_argument("--prompt-len", type=int, default=512, help="random-token prompt length (no prompt file)")
    ap.add_argument("--log-stats-s", type=float, default=None, metavar="S",
                    help="log the step loop's progress every S seconds to stderr (tokens/s, the k chosen, GPU busy "
                         "share, host time per stage, graphs captured): what shows why a long run is slow")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                    help="JSONL of questions, used with a tokenizer (SmolLM2); else random-token prompts")
    ap.add_argument("--temperature", nargs="+", type=float, default=[0.0, 0.6])
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling when temperature > 0")
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.05)
    ap.add_argument("--min-budget", type=int, default=128)
    ap.add_argument("--recent", type=int, default=16)
    ap.add_argument("--hybrid-split", type=_split, default="request",
                    help="the hybrid draft's window share: request / layer (adaptive) or a number in [0, 1]")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--compiler", default=None, choices=["inductor", "eager"],
                    help="the runtime's compiler (default: inductor on the GPU, eager on the CPU)")
    ap.add_argument("--cuda-graphs", default=None, choices=["auto", "on", "off", "pad"],
                    help="the runtime's CUDA-graph mode (default: SparseSpecConfig's)")
    ap.add_argument("--fuse-projections", action="store_true",
                    help="one GEMM per q/k/v and gate/up group (SparseSpecConfig.fuse_projections)")
    ap.add_argument("--overlap", default="auto", choices=["auto", "on", "off"],
                    help="host/device overlap with delayed verification (SparseSpecConfig.overlap; auto: on for one "
                         "CUDA device, stride > 0)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed generates per cell after the warm-up (same LLM); the median is the figure, every "
                         "repeat's tokens/s is in the JSON (repeat_tokens_per_s)")
    ap.add_argument("--warmup-tokens", type=int, default=32, help="tokens per request of each runtime warm-up")
    ap.add_argument("--hf-max-tokens", type=int, default=128,
                    help="tokens per request of the HF baselines (capped at the output length)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/e2e"), help="folder for e2e.json and e2e.png")
    ap.add_argument("--results-md", type=Path, default=None, help="append the markdown table to this file")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="skip the remaining cells (recorded as skipped) once this much time has passed")
    ap.add_argument("--save-tokens", action="store_true", help="keep every request's token ids in the JSON")
    ap.add_argument("--seed", type=int, default=0, help="random-token prompts")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (CPU runs: on few cores 1 beats threads spinning on each other)")
    args = ap.parse_args(argv)
    if args.model not in MODEL_NAMES and not Path(args.model).is_dir():
        ap.error(f"--model {args.model!r} is neither one of {', '.join(MODEL_NAMES)} nor a checkpoint directory")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    args.compiler = args.compiler or ("inductor" if args.device.startswith("cuda") else "eager")
    if args.recent > args.min_budget:
        ap.error(f"--recent {args.recent} must be <= --min-budget {args.min_budget}")
    if not 0.0 < args.kv_pool_fraction <= 1.0:
        ap.error(f"--kv-pool-fraction {args.kv_pool_fraction} must be in (0, 1]")
    if isinstance(args.hybrid_split, float) and not 0.0 <= args.hybrid_split <= 1.0:
        ap.error(f"--hybrid-split {args.hybrid_split} must be request, layer or a number in [0, 1]")
    if args.requests_per_slot < 1:
        ap.error(f"--requests-per-slot {args.requests_per_slot} must be >= 1")
    return args
