"""Host time a step of the adaptive default costs when it decodes plainly, against stride 0: the real engine
(scheduler, stride policy, gate, sampler, bookkeeping) on a one-layer random Llama with the reference attention on
the CPU, so the model's own time is small and the same in both runs. The GPU benchmark's never-slower cells need
the two to cost the host the same (bench/RESULTS.md).

    python bench/host_cost_plain.py [--batch 256] [--tokens 160] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import transformers

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig


def run(mode: str, batch: int, tokens: int, profile: bool) -> None:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    common = dict(compiler="eager", num_pages=batch * 40, max_num_seqs=batch, max_num_batched_tokens=8192,
                  min_budget=16)
    llm = LLM(model, SparseSpecConfig(stride=0, **common) if mode == "stride0" else SparseSpecConfig(**common))
    prompts = [[1 + (i * 7 + j) % 200 for j in range(40)] for i in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), use_tqdm=False)
    llm.stats(reset=True)
    prof = cProfile.Profile() if profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    llm.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t
    s = llm.stats()
    per = {k.removesuffix("_seconds"): round(1e3 * s[k] / s["steps"], 3)
           for k in ("schedule_seconds", "launch_seconds", "resolve_seconds")}
    print(f"{mode}: {s['steps']} steps, {1e3 * wall / s['steps']:.2f} ms a step, mean k {s['mean_k']:.2f}, "
          f"host ms a step {per}", flush=True)
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=160, help="output tokens a request, timed")
    ap.add_argument("--profile", action="store_true", help="cProfile each timed run (top 20 by own time)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for mode in ("stride0", "sparsespec"):
        run(mode, args.batch, args.tokens, args.profile)


if __name__ == "__main__":
    main()
