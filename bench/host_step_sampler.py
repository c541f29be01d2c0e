"""Host cost of ``StepSampler.run`` (sampling and verification launches) and ``StepResults.lists()`` alone, on steps
recorded from the engine of bench/host_step_engine.py (stub forward, B 256), replayed through a fresh sampler:
time per step, and aten ops per step counted with a dispatch mode (on a GPU each compute op is a kernel launch and
each tensor made from host data an H2D copy).

    OMP_NUM_THREADS=1 python bench/host_step_sampler.py [--batch 256] [--stride 8] [--temperature 0]
        [--top-p 1] [--seeded] [--mixed] [--steps 30] [--repeats 7] [--dump out.json]

``--dump``: the replayed steps' ``lists()`` (and a checksum), to compare two versions of the sampler exactly (same
recorded steps, same generator seed). Run it from each checkout's venv; the package imported is that venv's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import sparsespec_compile.runtime.engine as engine_module
from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.request import Request, RequestState
from sparsespec_compile.kernels import sampling_reference as ref
from sparsespec_compile.runtime.step_sampler import StepSampler

_KERNELS = ("sample_rows_reference", "residual_reference")

_VIEWS = {"view", "_unsafe_view", "unbind", "slice", "select", "t", "transpose", "unsqueeze", "squeeze", "expand",
          "alias", "detach", "as_strided", "lift_fresh", "_reshape_alias", "reshape"}


class _Count(TorchDispatchMode):
    """Aten ops by name; the sampling kernels' torch references (one Triton launch each on the GPU) count as one."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._real = {name: getattr(ref, name) for name in _KERNELS}
        for name, f in self._real.items():
            setattr(ref, name, self._as_one(name, f))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, f in self._real.items():
            setattr(ref, name, f)
        return super().__exit__(*exc)

    def _as_one(self, name, f):
        def kernel(*a, **kw):
            self.ops[f"kernel.{name}"] += 1
            self.paused = True
            try:
                return f(*a, **kw)
            finally:
                self.paused = False
        return kernel


def _stub_class():
    spec = importlib.util.spec_from_file_location("host_step_engine", Path(__file__).with_name("host_step_engine.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.StubForward


def record(args) -> list[tuple]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1 << 15)).eval()
    max_tokens = 200 + args.steps
    pages = args.batch * ((64 + max_tokens + 2 * args.stride) // 16 + 2) + 64
    llm = LLM(model, SparseSpecConfig(adaptive=False, stride=args.stride, min_budget=16, max_num_seqs=args.batch,
                                      num_pages=pages, compiler="eager", overlap=True, max_num_batched_tokens=8192))
    engine_module.run_packed = _stub_class()(args.vocab, 0.85)
    eng, sched = llm.engine, llm.engine.scheduler
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        seed = i if args.seeded else None
        temperature = (0.0, args.temperature, 1.0)[i % 3] if args.mixed else args.temperature
        top_p = (args.top_p if i % 2 else 1.0) if args.mixed else args.top_p
        eng.add_request(Request(torch.randint(10, args.vocab, (64,), generator=g).tolist(),
                                SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=temperature,
                                               top_p=top_p if temperature > 0 else 1.0, seed=seed)))
    while sched.waiting or any(r.state is RequestState.PREFILL for r in sched.running):
        eng.step()
    for _ in range(20):
        eng.step()
    steps, inner = [], eng.sampler.run

    def rec(plan, logits, input_ids=None):
        steps.append((plan, logits.clone(), None if input_ids is None else input_ids.clone()))
        return inner(plan, logits, input_ids)

    eng.sampler.run = rec
    for _ in range(args.steps):
        eng.step()
    return steps


def replay(steps, mode=None):
    """One pass through a fresh sampler: (run seconds, lists seconds, lists per step). Process CPU time, not wall:
    the machine is shared, and time spent descheduled is no cost of the code."""
    torch.manual_seed(1)
    sampler, t_run, t_lists, out = StepSampler(), 0.0, 0.0, []
    for plan, logits, ids in steps:
        t = time.process_time()
        if mode is not None:
            with mode:
                res = sampler.run(plan, logits, ids)
                res.start_copy()
        else:
            res = sampler.run(plan, logits, ids)
            res.start_copy()
        t_run += time.process_time() - t
        t = time.process_time()
        out.append(res.lists())
        t_lists += time.process_time() - t
    return t_run, t_lists, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seeded", action="store_true")
    ap.add_argument("--mixed", action="store_true", help="temperatures 0 / --temperature / 1 and top-p by request")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()
    steps = record(args)
    n = len(steps)
    count = _Count()
    _, _, out = replay(steps, count)
    runs, lists = [], []
    for _ in range(args.repeats):
        a, b, again = replay(steps)
        assert again == out
        runs.append(1e3 * a / n)
        lists.append(1e3 * b / n)
    views = sum(c for op, c in count.ops.items() if op.removeprefix("aten.") in _VIEWS)
    total = sum(count.ops.values())
    made = count.ops.get("aten.lift_fresh", 0)
    print(f"B {args.batch}, k {args.stride}, temperature {args.temperature}{' seeded' if args.seeded else ''}{' mixed' if args.mixed else ''}, "
          f"{n} steps ({sum(len(p.entries) for p, _, _ in steps) / n:.0f} entries a step): CPU time run+start_copy "
          f"{statistics.median(runs):.3f} ms/step, lists {statistics.median(lists):.3f} ms/step (medians of "
          f"{args.repeats}); aten ops/step {total / n:.1f} ({(total - views) / n:.1f} non-view, "
          f"{made / n:.1f} tensors from host data)")
    for op, c in count.ops.most_common(20):
        print(f"  {c / n:6.1f}  {op}")
    if args.dump:
        Path(args.dump).write_text(json.dumps({"lists": out, "sha1": hashlib.sha1(json.dumps(out).encode()).hexdigest()}))


if __name__ == "__main__":
    main()
