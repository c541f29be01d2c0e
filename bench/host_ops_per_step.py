"""Aten ops a step issues outside the model (sampling and verification), counted with a dispatch mode on a tiny
random Llama on the CPU. Each one is host time and, on a GPU, usually a kernel launch outside the CUDA graph.

    TRITON_INTERPRET=1 python bench/host_ops_per_step.py [--temperature 0.6] [--batch 64] [--stride 8]
"""

from __future__ import annotations

import argparse
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.step_sampler import StepSampler
from sparsespec_compile.testing.checks import smallest_llama


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    model = smallest_llama()
    prompts = [[5 + (i * 7 + j) % 90 for j in range(16)] for i in range(args.batch)]
    llm = LLM(model, SparseSpecConfig(adaptive=False, compiler="eager", num_pages=args.batch * (args.tokens + 40) // 4 + 64,
                                      page_size=4, max_num_batched_tokens=2048, stride=args.stride, min_budget=16,
                                      recent=4, max_num_seqs=args.batch, cuda_graphs="pad"))
    count, steps = _Count(), [0]
    inner = StepSampler.run

    def counted(self, *a, **kw):
        steps[0] += 1
        with count:
            return inner(self, *a, **kw)

    StepSampler.run = counted
    try:
        llm.generate(prompts, SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=args.temperature,
                                             top_p=args.top_p if args.temperature > 0 else 1.0), use_tqdm=False)
    finally:
        StepSampler.run = inner
    n = steps[0]
    print(f"temperature {args.temperature}, B {args.batch}, k {args.stride}: "
          f"{sum(count.ops.values()) / n:.1f} aten ops per step outside the model ({n} steps)")
    for op, c in count.ops.most_common(12):
        print(f"  {c / n:6.1f}  {op}")


if __name__ == "__main__":
    main()
