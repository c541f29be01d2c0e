"""Steps a KV pool at a share of the demand needs, against an unconstrained pool: the scheduler's side of the
2x-oversubscription figure, on the CPU (tiny random Llama, stride 0; step counts do not depend on the model).

    TRITON_INTERPRET=1 python bench/oversubscription_steps.py [--batch 16] [--tokens 128] [--fraction 0.5]

With equal output lengths a closed batch grows in lockstep: once the pool is full, only about half the requests fit
at full length, so the run needs ~1.5x the steps whatever the offload path costs. A queue (--requests-per-slot > 1)
refills the freed slots; equal lengths still move in waves, which limits how much it helps.
"""

from __future__ import annotations

import argparse
import math

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.testing.checks import smallest_llama

PROMPT_LEN, PAGE = 8, 4


def steps(model, batch: int, tokens: int, requests_per_slot: int, fraction: float) -> tuple[int, float]:
    per_request = math.ceil((PROMPT_LEN + tokens + 2) / PAGE)
    pages = per_request * batch + 4 if fraction >= 1 else max(math.ceil(fraction * per_request * batch), per_request)
    llm = LLM(model, SparseSpecConfig(adaptive=False, compiler="eager", num_pages=pages, page_size=PAGE, max_num_batched_tokens=256,
                                      stride=0, max_num_seqs=batch,
                                      host_kv_pages=per_request * batch * requests_per_slot))
    prompts = [[5 + (i * 7 + j) % 90 for j in range(PROMPT_LEN)] for i in range(batch * requests_per_slot)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=tokens, ignore_eos=True), use_tqdm=False)
    if any(len(o.token_ids) != tokens for o in outs):
        raise RuntimeError("a request did not get all its tokens")
    s = llm.stats()
    return s["steps"], s["mean_requests_per_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--fraction", type=float, default=0.5)
    args = ap.parse_args()
    model = smallest_llama()
    print("| requests per slot | pool | steps | requests per step | steps vs pool 1.0 |\n|---:|---:|---:|---:|---:|")
    for rps in (1, 4):
        base, base_per_step = steps(model, args.batch, args.tokens, rps, 1.0)
        n, per_step = steps(model, args.batch, args.tokens, rps, args.fraction)
        print(f"| {rps} | 1.0 | {base} | {base_per_step:.1f} | 1.00 |")
        print(f"| {rps} | {args.fraction} | {n} | {per_step:.1f} | {n / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
