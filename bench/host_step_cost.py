"""Host cost of one decode step outside the model: schedule, shape + pack (with and without the incremental block
tables), update — on a simulated batch (no model, no device), so it runs anywhere.

    python bench/host_step_cost.py [--batch 64] [--stride 8] [--context 3300] [--steps 200] [--adaptive]

``--adaptive``: the per-request stride, to see what choosing k and re-balancing phases at every cycle start adds
to schedule/update; ``--prices kv`` (default) is a fixed KV-bound price list, so every request keeps speculating,
``--prices seed`` the step-cost seed measured on the H200 (runtime/step_cost.py), under which many requests decode
plainly. ``--accept P``: each draft is accepted with probability P (default 1: the fake verifier returns the drafts
plus a bonus token, so contexts grow at full speed).
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.runtime.block_allocator import BlockAllocator
from sparsespec_compile.runtime.padded_step import BlockTableMirror, pack_step
from sparsespec_compile.runtime.request import Request
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.scheduler import Scheduler
from sparsespec_compile.runtime.step_plan import StepKind
from sparsespec_compile.runtime.step_cost import SEED, FixedStepCost
from sparsespec_compile.runtime.step_shapes import shape_for
from sparsespec_compile.runtime.stride_policy import AdaptiveStride


def fake_results(plan, accept: float = 1.0, rng: random.Random | None = None) -> list[list[int]]:
    out = []
    for e in plan.entries:
        if e.kind is StepKind.VERIFY:
            n = 0
            while n < len(e.draft_token_ids) and (accept >= 1.0 or rng.random() < accept):
                n += 1
            out.append(list(e.draft_token_ids[:n]) + [7])
        else:
            out.append([7] * e.num_logits)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--context", type=int, default=3300, help="tokens per request before timing")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--adaptive", action="store_true")
    ap.add_argument("--prices", choices=("kv", "seed"), default="kv")
    ap.add_argument("--accept", type=float, default=1.0)
    args = ap.parse_args()
    rng = random.Random(0)
    page = 16
    cfg = SparseSpecConfig(adaptive=False, stride=args.stride, max_num_seqs=args.batch)
    max_tokens = args.context + args.steps * (args.stride + 1) + 64
    pages = args.batch * ((max_tokens + 100 + 2 * args.stride) // page + 2)
    prices = FixedStepCost(0.0, 0.0, 1.0, 0.1) if args.prices == "kv" else FixedStepCost(*SEED)
    policy = AdaptiveStride(args.stride, prices, cfg.budget) if args.adaptive else None
    s = Scheduler(BlockAllocator(pages, page), stride=args.stride, max_num_batched_tokens=8192,
                  max_model_len=1 << 20, max_num_seqs=args.batch, policy=policy)
    for _ in range(args.batch):
        if not s.add(Request(list(range(1, 100)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))):
            raise SystemExit("the simulated request was rejected: pool too small")
    while min((r.num_computed_tokens for r in s.running), default=0) < args.context or len(s.running) < args.batch:
        p = s.schedule()
        s.update(p, fake_results(p, args.accept, rng))
    mirror = BlockTableMirror()
    t = {"schedule": 0.0, "pack (lists)": 0.0, "pack (mirror)": 0.0, "update": 0.0}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        p = s.schedule()
        t1 = time.perf_counter()
        shape = shape_for(p, args.stride, page, 8192)
        if shape is not None:
            a = pack_step(p, shape, cfg, page, args.batch)
            t2 = time.perf_counter()
            b = pack_step(p, shape, cfg, page, args.batch, tables=mirror)
            t3 = time.perf_counter()
            assert np.array_equal(a, b)
            t["pack (lists)"] += t2 - t1
            t["pack (mirror)"] += t3 - t2
        t4 = time.perf_counter()
        s.update(p, fake_results(p, args.accept, rng))
        t["schedule"] += t1 - t0
        t["update"] += time.perf_counter() - t4
    ctx = sum(r.num_computed_tokens for r in s.running) / len(s.running)
    print(f"batch {args.batch}, stride {args.stride}{' adaptive' if args.adaptive else ''}, mean context {ctx:.0f} "
          f"tokens, {args.steps} steps:")
    for k, v in t.items():
        print(f"  {k:14s} {1e3 * v / args.steps:.3f} ms/step")


if __name__ == "__main__":
    main()
