"""GPU check of runtime/verify.py (not collected by pytest): runs on CUDA, no op syncs the host (sync debug
mode "error"), the Triton path draws the same tokens as the torch reference, and the time of one draft sampling +
verification for a Qwen3-sized vocabulary, per sampling configuration.
Run: python3 tests/runtime/gpu_verify_check.py  (needs `pip install -e .`; bench/sampler.py times the sampler alone)

Before issue 18 (one H200, torch 2.11+cu130, 2026-11-29, N=64 k=8 V=151936, GPU time): greedy 0.71 ms; temperature
0.6: 2.80 ms; + top_p 0.95: 21.86 ms (full vocabulary sort); + top_k 20 + top_p 0.95, seeded: 5.64 ms (torch.topk)."""
import time

import torch

from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.verify import Drafts, PositionSeed, rejection_sample, sample

dev, N, k, V = "cuda", 64, 8, 151_936
torch.manual_seed(0)
rank = torch.rand(N * (k + 1), V, device=dev).argsort(-1).float() + 1
target = (-rank.log() + 0.05 * torch.randn_like(rank)).to(torch.bfloat16)  # [N*(k+1), V] language-model-like rows
draft = (target.view(N, k + 1, V)[:, :k].float() + 0.5 * torch.randn(N, k, V, device=dev)).to(torch.bfloat16)
draft = draft.reshape(N * k, V)
index = torch.arange(N * (k + 1), device=dev).view(N, k + 1)
configs = {
    "greedy": SamplingParams(),
    "temperature 0.6": SamplingParams(temperature=0.6),
    "t0.6 top_p 0.95": SamplingParams(temperature=0.6, top_p=0.95),
    "t0.6 top_k 20 top_p 0.95, seeded rows": SamplingParams(temperature=0.6, top_p=0.95, top_k=20, seed=1),
}
for name, p in configs.items():
    seeds = [PositionSeed(i, 100) for i in range(N)] if p.seed is not None else None
    dseeds = [PositionSeed(s.seed, s.position + j) for s in seeds for j in range(k)] if seeds else None
    for impl in ("triton", "reference"):
        g = torch.Generator(device=dev).manual_seed(1)
        d, q = sample(draft, p, dseeds, generator=g, impl=impl)
        drafts = Drafts(draft, q, torch.arange(N * k, device=dev).view(N, k)) if q is not None else None
        out = rejection_sample(d.view(N, k), drafts, target, p, seeds, generator=g, target_index=index, impl=impl)
        if impl == "triton":
            first = (d, out)
    assert torch.equal(first[0], d) and torch.equal(first[1][1], out[1]), f"{name}: triton != reference"
    times = []
    for it in range(5):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing op raises
        a0, a1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a0.record()
        d, q = sample(draft, p, dseeds)  # the k draft steps' sampling, batched here
        drafts = Drafts(draft, q, torch.arange(N * k, device=dev).view(N, k)) if q is not None else None
        a, out = rejection_sample(d.view(N, k), drafts, target, p, seeds, target_index=index)
        a1.record()
        host = time.perf_counter() - t0
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        times.append((host * 1e3, a0.elapsed_time(a1)))
    h, g = map(lambda xs: sorted(xs)[len(xs) // 2], zip(*times[1:]))
    print(f"{name:40s} draft sample + verify, N={N} k={k} V={V}: GPU {g:6.2f} ms, host launch {h:5.2f} ms")
print("OK: no host sync; Triton tokens == reference tokens", torch.cuda.get_device_name())
