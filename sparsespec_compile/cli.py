"""``sparsespec`` command line: ``inspect`` (the rewrite report), ``demo`` (the embedded model end to end),
``generate`` (the speculative runtime on prompts)."""

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


def main(argv: list[str] | None = None) -> int:
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

    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
