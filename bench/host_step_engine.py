"""Host cost of the whole engine step — schedule, pack, sampling and verification launches, the overlap structure,
resolve — with the model's forward replaced by a stub that returns logits at once, so it runs on any CPU and
measures only what the host does for a step.

    python bench/host_step_engine.py [--batch 256] [--stride 8] [--accept 0.85] [--steps 100] [--overlap on]
        [--prompt-len 64] [--vocab 512] [--json out.json] [--profile cumulative|tottime]

Why: on the H200 a B 256 k = 8 PillarAttn step is host-bound (2026-12-01, SmolLM2 real weights, B 256, 4,096
outputs: launch 5.7 + schedule 1.0 + resolve 1.3 ms of host a step against ~3.2 ms of device work; stride 0: 6.0
ms of host against 4.9 ms of device). Each speculative step yields ~0.53 tokens a request, so the host must cost
well under half a plain step's for speculation to pay. This is the figure to drive down; stride 0 is timed by the
same command with ``--stride 0``.

The stub: every logit row is zero except, with probability ``1 - sqrt(accept)``, one random token raised, so greedy
drafts and their verification agree at a position with probability ~``accept`` (mean accepted ≈ sum accept^i). Its
own time (one small tensor a step) is timed apart and left out of ``host ms/step``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import pstats
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsespec_compile.runtime.engine as engine_module
from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.request import Request, RequestState


class StubForward:
    """Stands in for ``run_packed``: logits ``[T, V]`` made at once; keeps its own time."""

    def __init__(self, vocab: int, accept: float, seed: int = 0) -> None:
        self.vocab, self.p_random = vocab, 1.0 - math.sqrt(accept)
        self.gen = torch.Generator().manual_seed(seed)
        self.seconds = 0.0

    def __call__(self, compiled, packed, shape, **_):
        t = time.perf_counter()
        rows = shape.tokens
        logits = torch.zeros(rows, self.vocab)
        hit = torch.rand(rows, generator=self.gen) < self.p_random
        tok = torch.randint(1, self.vocab, (rows,), generator=self.gen)
        logits[hit, tok[hit]] = 1.0
        self.seconds += time.perf_counter() - t
        return logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--accept", type=float, default=0.85, help="per-position draft/verify agreement of the stub")
    ap.add_argument("--steps", type=int, default=100, help="timed steps (after every prompt is in and 20 more)")
    ap.add_argument("--overlap", choices=("on", "off"), default="on")
    ap.add_argument("--adaptive", action="store_true", help="the per-request stride (default: a fixed k)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--profile", choices=("cumulative", "tottime"), default=None,
                    help="one more round under cProfile, its top 40 printed (cProfile inflates small calls ~2x)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: the stub's and the host's tiny ops gain nothing from more, and on a "
                         "shared 2-core machine spinning OpenMP threads made rounds vary 22-130 ms)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1 << 15)).eval()
    max_tokens = 40 + (args.repeats + 1) * args.steps * 2  # every request decodes through all timed rounds
    pages = args.batch * ((args.prompt_len + max_tokens + 2 * args.stride) // 16 + 2) + 64
    llm = LLM(model, SparseSpecConfig(adaptive=args.adaptive, stride=args.stride, min_budget=16,
                                      max_num_seqs=args.batch, num_pages=pages, compiler="eager",
                                      overlap=args.overlap == "on", max_num_batched_tokens=8192))
    stub = StubForward(args.vocab, args.accept)
    engine_module.run_packed = stub  # the engine's one forward call (Engine._forward, eager path)
    eng, sched = llm.engine, llm.engine.scheduler
    g = torch.Generator().manual_seed(0)
    for _ in range(args.batch):
        eng.add_request(Request(torch.randint(10, args.vocab, (args.prompt_len,), generator=g).tolist(),
                                SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    while sched.waiting or any(r.state is RequestState.PREFILL for r in sched.running):
        eng.step()
    for _ in range(20):
        eng.step()

    def timed_round() -> dict:
        eng.reset_stats()
        stub.seconds = 0.0
        t = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        wall = time.perf_counter() - t
        s = eng.stats
        n = args.steps
        return {"host_ms_per_step": 1e3 * (wall - stub.seconds) / n,
                "schedule_ms": 1e3 * s.schedule_seconds / n,
                "launch_ms": 1e3 * (s.launch_seconds - stub.seconds) / n,
                "resolve_ms": 1e3 * s.resolve_seconds / n,
                "tokens_per_step": s.forward_tokens / n, "requests_per_step": s.request_steps / n,
                "output_tokens_per_step": s.output_tokens / n}

    rounds = [timed_round() for _ in range(args.repeats)]
    med = sorted(rounds, key=lambda r: r["host_ms_per_step"])[len(rounds) // 2]
    accepted = llm.stats().get("mean_accepted")
    print(f"batch {args.batch}, stride {args.stride}{' adaptive' if args.adaptive else ''}, overlap {args.overlap}, "
          f"{med['requests_per_step']:.0f} requests / {med['tokens_per_step']:.0f} tokens a step, mean accepted "
          f"{accepted or 0:.2f}: host {med['host_ms_per_step']:.2f} ms/step (schedule {med['schedule_ms']:.2f}, "
          f"launch {med['launch_ms']:.2f}, resolve {med['resolve_ms']:.2f}); rounds "
          f"{[round(r['host_ms_per_step'], 2) for r in rounds]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median": med, "rounds": rounds, "mean_accepted": accepted}, f, indent=1)
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            eng.step()
        pr.disable()
        pstats.Stats(pr, stream=sys.stdout).sort_stats(args.profile).print_stats(40)


if __name__ == "__main__":
    main()
