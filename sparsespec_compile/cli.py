"""``sparsespec`` command line: ``inspect`` (the rewrite report), ``demo`` (the embedded model end to end),
``generate`` (the speculative runtime on prompts), ``check`` (CI checks), ``serve`` (an OpenAI-compatible server),
``bench`` (the end-to-end benchmark)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _model_dir(path: str) -> Path:
    """``--model DIR`` checked before anything loads (a missing directory used to end in a hub-id traceback)."""
    p = Path(path)
    if not p.is_dir():
        raise SystemExit(f"sparsespec: --model {path}: no such directory (a Hugging Face model directory with "
                         "config.json and weights; nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise SystemExit(f"sparsespec: --model {path}: no config.json in that directory")
    return p


def _load(args: argparse.Namespace, tokenizer: bool):
    """(model, tokenizer or None) from --model DIR, --config PATH (random weights) or the embedded SmolLM2.
    ``tokenizer``: load the tokenizer too (only ``generate`` uses it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import EMBEDDED, load_embedded, load_smollm2

    if getattr(args, "model", None) in EMBEDDED and not Path(args.model).is_dir():  # an embedded model by name
        return load_embedded(args.model, attn=args.attn)
    if getattr(args, "model", None):
        path = _model_dir(args.model)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=args.attn)
        return model.eval(), AutoTokenizer.from_pretrained(path) if tokenizer else None
    if getattr(args, "config", None):
        cfg = AutoConfig.from_pretrained(args.config)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=args.attn).eval(), None
    return load_smollm2(attn=args.attn)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect

    model, _ = _load(args, tokenizer=False)
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
    from .runtime.kv_cache import pages_for_requests
    from .runtime.prompts import encode

    # Every flag is checked before the model loads (~20 s for the embedded model on 2 cores).
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        knobs = dict(stride=args.stride, draft=args.draft, sparsity=args.sparsity, compiler=args.compiler)
        if args.min_budget is not None:
            knobs["min_budget"] = args.min_budget
        SparseSpecConfig(**knobs, num_pages=args.num_pages)
    except ValueError as exc:
        raise SystemExit(f"sparsespec generate: {exc}") from None
    model, tok = _load(args, tokenizer=True)
    chat = args.chat_template
    if chat is None:  # default: the template when the tokenizer has one (an Instruct model answers empty without)
        chat = bool(getattr(tok, "chat_template", None))
    elif chat and not getattr(tok, "chat_template", None):
        raise SystemExit("sparsespec generate: --chat-template: the tokenizer has no chat template "
                         "(use --no-chat-template)")
    try:
        prompts = [encode(p, tok, chat) for p in (args.prompts or DEFAULT_PROMPTS)]
    except ValueError as exc:
        raise SystemExit(f"sparsespec generate: {exc}") from None
    page = SparseSpecConfig.page_size  # the default: what the prompts can need, not a share of the machine's memory
    config = SparseSpecConfig(**knobs, max_num_seqs=len(prompts), num_pages=args.num_pages or sum(
        pages_for_requests(1, len(p) + args.max_tokens, args.stride, page) for p in prompts))
    llm = LLM(model, config, tokenizer=tok)
    outs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    for out in outs:
        print(f"[{out.finish_reason}] {out.text!r}")
    print(format_stats(llm.stats()))
    failed = [i for i, o in enumerate(outs) if o.finish_reason.startswith("error")]
    if failed:
        print(f"sparsespec generate: {len(failed)} of {len(outs)} request(s) failed: prompts {failed}", file=sys.stderr)
        return 1
    return 0


def format_stats(s: dict) -> str:
    """``llm.stats()`` for people: throughput without compile time, acceptance, steps."""
    lines = [f"{s['output_tokens']} tokens in {s['seconds']:.2f} s: {s['tokens_per_s']:.1f} tokens/s "
             f"({s['compile_seconds']:.1f} s of steps that compiled a graph left out), {s['steps']} steps"]
    if s["stride"]:
        pos = " ".join(f"{x:.2f}" for x in s["per_position_acceptance"])
        lines.append(f"stride {s['stride']} ({s['draft']} drafts): mean accepted {s['mean_accepted']:.2f} of "
                     f"{s['stride']} over {s['cycles']} cycles; per position {pos}")
    if s.get("mean_recall") is not None:
        lines.append(f"draft recall (verify attention inside the next draft's keys) {s['mean_recall']:.3f}")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    """Every check of ``sparsespec_compile.testing`` on one model; a pass/fail table; exit 1 if any failed."""
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


SERVE_KNOBS = ("stride", "draft", "sparsity", "min_budget", "num_pages", "kv_memory_fraction", "max_num_seqs",
               "max_num_batched_tokens")


CPU_MAX_NUM_SEQS = 8


def _option(text: str) -> tuple[str, object]:
    """``--option KEY=VALUE``: VALUE as JSON (numbers, true/false/null), else a string."""
    import json

    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a SparseSpecConfig field), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _check_serve_dir(path: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise SystemExit(f"sparsespec serve: {path}: not a Hugging Face model directory (no config.json there; "
                         "nothing is downloaded)")
    return p


def serve_config(args: argparse.Namespace):
    """The ``SparseSpecConfig`` of ``sparsespec serve``'s flags (checked: ``SystemExit`` naming the bad one)."""
    import torch

    from . import SparseSpecConfig

    cuda = torch.cuda.is_available()
    knobs = {k: getattr(args, k) for k in SERVE_KNOBS if getattr(args, k) is not None}
    # Inductor's C++ build of a 30-layer model takes minutes on a CPU
    knobs["compiler"] = args.compiler or ("inductor" if cuda else "eager")
    if not cuda:  # a CPU: a few sequences (64 took 12 GB of pool for SmolLM2), no host pool (it is the same memory)
        knobs.setdefault("max_num_seqs", CPU_MAX_NUM_SEQS)
        knobs.setdefault("offload", False)
    if args.adaptive is not None:
        knobs["adaptive"] = args.adaptive
    for key, value in args.option:
        knobs[key] = value
    try:
        return SparseSpecConfig(**knobs)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"sparsespec serve: {exc}") from None


def load_served(args: argparse.Namespace, config):
    """(LLM, served model name) for ``sparsespec serve [MODEL_DIR]`` (no MODEL_DIR: the embedded SmolLM2, bf16 on a
    GPU). ``bench/serve_load.py`` builds its offline LLM with this too, so both sides run the same model and config."""
    import torch

    from . import LLM

    cuda = torch.cuda.is_available()
    if args.model_dir is None:
        from .models import load_smollm2

        model, tok = load_smollm2(dtype=torch.bfloat16 if cuda else torch.float32, device="cuda" if cuda else "cpu")
        llm = LLM(model, config, tokenizer=tok)
    else:
        llm = LLM(str(_check_serve_dir(args.model_dir)), config)
    if llm.tokenizer is None:
        raise SystemExit(f"sparsespec serve: {args.model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return llm, served_name(args)


def served_llm(args: argparse.Namespace, config):
    """``load_served``'s LLM: what ``sparsespec serve``'s engine process builds (a picklable builder with
    ``functools.partial``)."""
    return load_served(args, config)[0]


def served_name(args: argparse.Namespace) -> str:
    return args.served_model_name or (args.model_dir if args.model_dir is not None else "SmolLM2-135M-Instruct")


def cmd_serve(args: argparse.Namespace) -> int:
    """``sparsespec serve [MODEL_DIR]``: every flag checked, the model loaded, compiled and warmed up in the engine
    process, then uvicorn here."""
    import os

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"sparsespec serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'sparsespec[serve]'") from None
    config = serve_config(args)
    if not 0 < args.port < 65536:
        raise SystemExit(f"sparsespec serve: --port {args.port}: not a TCP port")
    if args.stream_interval < 1:
        raise SystemExit(f"sparsespec serve: --stream-interval {args.stream_interval}: must be >= 1")
    if args.model_dir is not None:
        _check_serve_dir(args.model_dir)
    api_key = args.api_key or os.environ.get("SPARSESPEC_API_KEY") or None
    import functools

    from .serve import serve, warm_up
    from .serve.async_engine import AsyncEngine
    from .serve.engine_base import EngineDead
    from .serve.process_engine import ProcessEngine

    if args.engine == "process":  # the child builds the LLM; the HTTP side here holds the tokenizer and lengths
        try:
            engine = ProcessEngine(functools.partial(served_llm, args, config), stream_interval=args.stream_interval,
                                   warmup=not args.no_warmup)
        except EngineDead as exc:
            raise SystemExit(f"sparsespec serve: {exc}") from None
    else:
        llm = served_llm(args, config)
        if not args.no_warmup:
            warm_up(llm)
        engine = AsyncEngine(llm, stream_interval=args.stream_interval)
    name = served_name(args)
    print(f"sparsespec serve: {name} on http://{args.host}:{args.port}/v1 (stride {config.stride}, "
          f"{engine.info.num_pages} KV pages of {config.page_size} tokens, {config.max_num_seqs} sequences, "
          f"offload {'on' if config.offload else 'off'})", flush=True)
    serve(engine, model_name=name, host=args.host, port=args.port, api_key=api_key, log_level=args.log_level)
    return 0


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server (/v1/completions, /v1/chat/completions, /metrics)")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                   help="Hugging Face model directory with its tokenizer (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SPARSESPEC_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: MODEL_DIR as given, or SmolLM2-135M-Instruct)")
    p.add_argument("--stride", type=int, default=None, help="most draft tokens per speculative cycle (k; 0 = none)")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="per-request stride in 0..k each cycle (default) or a fixed k")
    p.add_argument("--draft", default=None, choices=["pillar", "streaming", "full"], help="draft attention")
    p.add_argument("--sparsity", type=float, default=None, help="share of the context kept as pillars")
    p.add_argument("--min-budget", type=int, default=None, help="fewest pillars per draft")
    p.add_argument("--num-pages", type=int, default=None, help="KV pool size in pages (default: from free memory)")
    p.add_argument("--kv-memory-fraction", type=float, default=None, help="share of free memory for the KV pool")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"most requests in a step (default: 64 on a GPU, {CPU_MAX_NUM_SEQS} on a CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="most tokens in a step")
    p.add_argument("--compiler", default=None, choices=["eager", "inductor"],
                   help="run the rewritten graph eagerly or through Inductor (default: Inductor on a GPU)")
    p.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="any other SparseSpecConfig field, e.g. --option cuda_graphs=off --option fuse_projections=true")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed chunk, at least (the first goes at once): fewer chunks under heavy load")
    p.add_argument("--engine", default="process", choices=["process", "thread"],
                   help="run the step loop in a child process (default) or in a thread of the server's process, "
                        "sharing its interpreter lock with HTTP (0.20x offline tokens/s on an H200 at 256 clients)")
    p.add_argument("--no-warmup", action="store_true", help="serve at once (the first requests then pay the compiles)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(fn=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (and --help): hand it the rest untouched
        from .benchmark import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsespec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser, config: bool = True) -> None:
        src = p.add_mutually_exclusive_group()
        src.add_argument("--model", metavar="DIR",
                         help="Hugging Face model directory, or an embedded model: smollm2 (the default, "
                              "SmolLM2-135M-Instruct) or gemma3 (Gemma3-270M)")
        if config:
            src.add_argument("--config", help="HF config.json or its directory: random weights of that shape")
        p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation")

    p = sub.add_parser("inspect", help="print the rewrite report (one row per attention node)")
    model_args(p)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("demo", help="compile the embedded SmolLM2 and generate, checking against the original")
    p.add_argument("--prompt", default=None, help="the question (default: a word problem)")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens to generate")
    p.add_argument("--stride", type=int, default=4, help="draft tokens per speculative cycle (k)")
    p.add_argument("--compiler", default="eager", choices=["eager", "inductor"],
                   help="run the rewritten graph eagerly or through Inductor (minutes of C++ build on a CPU)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("generate", help="generate with the speculative runtime")
    model_args(p, config=False)  # a config alone has no tokenizer for text prompts
    p.add_argument("prompts", nargs="*", help="prompts (default: a few math word problems)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt, at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="per-request seed: reproducible sampling")
    p.add_argument("--stride", type=int, default=8, help="draft tokens per speculative cycle (k; 0 = no speculation)")
    p.add_argument("--draft", default="pillar", choices=["pillar", "streaming", "hybrid", "full"],
                   help="draft attention: PillarAttn, StreamingLLM sinks + window, hybrid (sinks + window + pillars, "
                        "split adaptively) or full (the upper bound)")
    p.add_argument("--sparsity", type=float, default=0.05, help="share of the context kept as pillars")
    p.add_argument("--min-budget", type=int, default=None, help="fewest pillars per draft (default 128)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pool size in pages of 16 tokens (default: what the prompts can need)")
    p.add_argument("--compiler", default="eager", choices=["eager", "inductor"],
                   help="run the rewritten graph eagerly or through Inductor")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap each prompt in the tokenizer's chat template (default: when it has one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("check", help="CI checks: rewrite coverage, logits, greedy lossless, sampling, recompiles")
    p.add_argument("path", nargs="?", help="HF model dir, or config.json / its dir (random weights); "
                   "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation")
    p.add_argument("--stride", type=int, default=4, help="draft tokens per speculative cycle (k)")
    p.add_argument("--budget", type=int, default=8, help="pillars per sparse draft (below the prompt lengths)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per request of the greedy check")
    p.add_argument("--compiler", default="eager", choices=["eager", "inductor"],
                   help="run the rewritten graph eagerly or through Inductor")
    p.add_argument("--num-cycles", type=int, default=50_000, help="draft/verify cycles of the sampler check")
    p.add_argument("--num-requests", type=int, default=64, help="sampled requests through the engine (0: skip)")
    p.add_argument("--max-graphs", type=int, default=3, help="most Dynamo graphs allowed while generating")
    p.add_argument("--seed", type=int, default=0, help="weights of a config-only model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_check)

    add_serve_parser(sub)

    # Listed for `sparsespec --help` only: main() hands `bench ...` to sparsespec_compile.benchmark before parsing.
    sub.add_parser("bench", help="end-to-end benchmark: HF generate vs the runtime (stride 0, PillarAttn, "
                   "streaming drafts); `sparsespec bench --help`", add_help=False)

    return parser


if __name__ == "__main__":
    sys.exit(main())
