"""``sparsespec`` command line: ``inspect`` (the rewrite report), ``demo`` (the embedded model end to end),
``generate`` (the speculative runtime on prompts), ``check`` (CI checks), ``bench`` (the end-to-end benchmark)."""

from __future__ import annotations

import argparse
import sys


def _load(args: argparse.Namespace):
    """(model, tokenizer or None) from --model PATH, --config PATH (random weights) or the embedded SmolLM2."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import load_smollm2

    if getattr(args, "model", None):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
        return model.eval(), AutoTokenizer.from_pretrained(args.model)
    if getattr(args, "config", None):
        cfg = AutoConfig.from_pretrained(args.config)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=args.attn).eval(), None
    return load_smollm2(attn=args.attn)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect

    model, _ = _load(args)
    report = inspect(model)
    print(report)
    layers = getattr(model.config, "num_hidden_layers", None)
    if layers is not None:
        print(f"{report.num_rewritten}/{layers} layers of {type(model).__name__} rewritten")
        return 0 if report.num_rewritten == layers else 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(prompt=args.prompt, max_tokens=args.max_tokens, stride=args.stride, compiler=args.compiler)


DEFAULT_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many clips did she sell?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
]


def cmd_generate(args: argparse.Namespace) -> int:
    from . import LLM, SamplingParams, SparseSpecConfig

    model, tok = _load(args)
    prompts = args.prompts or DEFAULT_PROMPTS
    if tok is None and any(isinstance(p, str) for p in prompts):
        raise SystemExit("--config builds a model without a tokenizer: text prompts need --model or the default model")
    llm = LLM(model, SparseSpecConfig(stride=args.stride, draft=args.draft, compiler="eager"), tokenizer=tok)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    for out in llm.generate(prompts, params, use_chat_template=True, use_tqdm=not args.no_progress):
        print(f"[{out.finish_reason}] {out.text!r}")
    print(llm.stats())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Every check of ``sparsespec_compile.testing`` on one model; a pass/fail table; exit 1 if any failed."""
    from pathlib import Path

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from .testing import tiny_model
    from .testing.suite import format_table, run_checks

    path = Path(args.path) if args.path else None
    if path is None:
        from .models import load_smollm2

        model, _ = load_smollm2(attn=args.attn)
    elif not path.exists():
        raise SystemExit(f"sparsespec check: {path} does not exist (a model directory, or a config.json / its dir)")
    elif path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=args.attn)
    else:  # a config alone: random weights, redrawn at O(1) scale so greedy argmaxes are not near-ties
        model = tiny_model(AutoConfig.from_pretrained(path), attn=args.attn, seed=args.seed)
    model.eval()
    with tqdm(total=6, desc="sparsespec check", unit="check", disable=args.no_progress) as bar:
        started: list[str] = []

        def progress(name: str) -> None:  # called as each check starts: the previous one is done
            if started:
                bar.update(1)
            started.append(name)
            bar.set_postfix_str(name)

        rows = run_checks(model, stride=args.stride, budget=args.budget, max_new_tokens=args.max_new_tokens,
                          compiler=args.compiler, num_cycles=args.num_cycles, num_requests=args.num_requests,
                          max_graphs=args.max_graphs, progress=progress)
        bar.update(bar.total - bar.n)
    print(format_table(rows))
    return 0 if all(r.ok is not False for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (and --help): hand it the rest untouched
        from .benchmark import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="sparsespec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        src = p.add_mutually_exclusive_group()
        src.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
        src.add_argument("--config", help="HF config.json or directory: random weights of that shape")
        p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation")

    p = sub.add_parser("inspect", help="print the rewrite report (one row per attention node)")
    model_args(p)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("demo", help="compile the embedded SmolLM2 and generate, checking against the original")
    p.add_argument("--prompt", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--compiler", default="eager", choices=["eager", "inductor"])
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("generate", help="generate with the speculative runtime")
    model_args(p)
    p.add_argument("prompts", nargs="*", help="prompts (default: a few math word problems)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--draft", default="pillar", choices=["pillar", "streaming", "full"])
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("check", help="CI checks: rewrite coverage, logits, greedy lossless, sampling, recompiles")
    p.add_argument("path", nargs="?", help="HF model dir, or config.json / its dir (random weights); "
                   "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--budget", type=int, default=8, help="pillars per sparse draft (below the prompt lengths)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--compiler", default="eager", choices=["eager", "inductor"])
    p.add_argument("--num-cycles", type=int, default=50_000, help="draft/verify cycles of the sampler check")
    p.add_argument("--num-requests", type=int, default=64, help="sampled requests through the engine (0: skip)")
    p.add_argument("--max-graphs", type=int, default=3, help="most Dynamo graphs allowed while generating")
    p.add_argument("--seed", type=int, default=0, help="weights of a config-only model")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_check)

    # Listed for `sparsespec --help` only: main() hands `bench ...` to sparsespec_compile.benchmark before parsing.
    sub.add_parser("bench", help="end-to-end benchmark: HF generate vs the runtime (stride 0, PillarAttn, "
                   "streaming drafts); `sparsespec bench --help`", add_help=False)

    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
