"""Acceptance of sparse self-speculation on real weights (SmolLM2-135M-Instruct or Gemma3-270M), per draft kind.

Acceptance is a property of the model and the draft, not of the hardware, so this runs on the CPU:

    python -m bench.acceptance --prompts ../shared/data/prompts/gsm8k_test.jsonl --num-prompts 16 \
        --max-tokens 2048 --drafts pillar streaming hybrid full --temperatures 0 0.6 --out bench/acceptance.json
    python -m bench.acceptance --model gemma3 ...   # the base Gemma3-270M (plain-text prompts: no chat template)

Writes one JSON record per (draft, temperature) and prints a markdown table (mean accepted drafts per full
stride-k cycle, per-position acceptance, draft recall, tokens generated, mean output length).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.benchmark.models import question_ids
from sparsespec_compile.models import EMBEDDED, load_embedded


def load_prompts(path: Path, n: int, tok) -> list[list[int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [question_ids(tok, r.get("question") or r.get("problem")) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=list(EMBEDDED))
    ap.add_argument("--hybrid-split", default="request", help="request / layer (adaptive) or a share in [0, 1]")
    ap.add_argument("--prompts", type=Path, default=Path("../shared/data/prompts/gsm8k_test.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.05)
    ap.add_argument("--min-budget", type=int, default=128)
    ap.add_argument("--recent", type=int, default=None, help="newest tokens always kept (default: min(16, min budget))")
    ap.add_argument("--drafts", nargs="+", default=["pillar", "streaming", "hybrid", "full"])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.6])
    ap.add_argument("--out", type=Path, default=Path("bench/acceptance.json"))
    ap.add_argument("--gguf", default=None, help="GGUF path, or gemma3's folder of pieces (default: the packages')")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ignore-eos", action="store_true", help="generate max_tokens for every prompt")
    ap.add_argument("--configs", nargs="*", default=None,
                    help="explicit draft:temperature pairs to run, in order (overrides --drafts/--temperatures)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long check of the script: 2 prompts, 24 tokens, budget 8, greedy only")
    args = ap.parse_args()
    if args.smoke:
        args.num_prompts, args.max_tokens, args.min_budget, args.recent = 2, 24, 8, 2
        args.temperatures, args.ignore_eos = [0.0], True
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tok = load_embedded(args.model, dtype=dtype, device=args.device, gguf_path=args.gguf)
    prompts = load_prompts(args.prompts, args.num_prompts, tok)
    split = args.hybrid_split if args.hybrid_split in ("request", "layer") else float(args.hybrid_split)
    results = []
    runs = [(d, float(t)) for d, t in (c.split(":") for c in args.configs)] if args.configs else [
        (d, t) for t in args.temperatures for d in args.drafts]
    for draft, temperature in runs:
        torch._dynamo.reset()
        cfg = SparseSpecConfig(
            adaptive=False, stride=args.stride, sparsity=args.sparsity, min_budget=args.min_budget, draft=draft,
            recent=args.recent,
            compiler="eager", num_pages=(args.max_tokens + 512) * args.num_prompts // 16 + 64, hybrid_split=split,
            max_num_seqs=args.num_prompts, max_num_batched_tokens=4096,
        )
        llm = LLM(model, cfg, tokenizer=tok)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature,
                                top_p=0.95 if temperature else 1.0, seed=0 if temperature else None,
                                ignore_eos=args.ignore_eos)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.stats()
        rec = {
            "model": f"{args.model} ({dtype}, {args.device})", "hybrid_split": split, "ignore_eos": args.ignore_eos, "draft": draft, "temperature": temperature,
            "stride": args.stride, "sparsity": args.sparsity, "min_budget": args.min_budget, "recent": cfg.recent,
            "prompts": len(prompts), "max_tokens": args.max_tokens,
            "mean_output_len": sum(len(o.token_ids) for o in outs) / len(outs),
            "finish_reasons": sorted({o.finish_reason for o in outs}),
            "wall_s": time.perf_counter() - t, **stats,
        }
        results.append(rec)
        print(json.dumps(rec), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    print("\n| draft | temp | mean accepted (of k) | per-position acceptance 1..k | draft recall | cycles | "
          "mean output len |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        pos = " ".join(f"{p:.2f}" for p in r["per_position_acceptance"])
        recall = "–" if r.get("mean_recall") is None else f"{r['mean_recall']:.3f}"
        print(f"| {r['draft']} | {r['temperature']} | {r['mean_accepted']:.2f} of {r['stride']} | {pos} | {recall} | "
              f"{r['cycles']} | {r['mean_output_len']:.0f} |")


if __name__ == "__main__":
    main()
