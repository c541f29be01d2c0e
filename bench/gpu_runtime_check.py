"""GPU check of the runtime with the Triton kernels (no CUDA graphs yet): a SmolLM2-shaped Llama with random bf16
weights, greedy, stride 0 (plain decoding) vs stride 8 (PillarAttn drafts) on the same prompts.

    PYTHONPATH=. python3 bench/gpu_runtime_check.py --out $OUT

Reports whether the speculative outputs equal the stride-0 outputs token for token (bf16: a k+1-token verify and
a one-token decode round differently, so a divergence at a near-tie is possible: the first divergent position is
reported, never forced), and tokens/s of both (host-bound: every step is an eager Python forward).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    prompts = [torch.randint(10, 49000, (args.prompt_len,)).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    results = {}
    for name, stride, budget in (("stride0", 0, 128), ("pillar_k8", 8, 32)):
        torch._dynamo.reset()
        llm = LLM(model, SparseSpecConfig(stride=stride, min_budget=budget, recent=8, compiler="eager",
                                          num_pages=4096, max_num_seqs=args.batch))
        llm.generate(prompts[:2], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up/compile
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        s = llm.stats()
        results[name] = {"tokens": [o.token_ids for o in outs], "seconds": dt,
                         "tokens_per_s": sum(len(o.token_ids) for o in outs) / dt,
                         "mean_accepted": s["mean_accepted"], "cycles": s["cycles"], "steps": s["steps"],
                         "errors": sorted({o.finish_reason for o in outs if o.finish_reason.startswith("error")})}
        print(name, {k: v for k, v in results[name].items() if k != "tokens"}, flush=True)
    a, b = results["stride0"]["tokens"], results["pillar_k8"]["tokens"]
    first_div = []
    for x, y in zip(a, b):
        d = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        first_div.append(d)
    summary = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "identical_requests": sum(d is None for d in first_div), "requests": len(first_div),
        "first_divergence": first_div,
        **{f"{n}_{k}": results[n][k] for n in results for k in ("tokens_per_s", "mean_accepted", "steps", "errors")},
    }
    print(json.dumps(summary, indent=1))
    (args.out / "gpu_runtime_check.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
