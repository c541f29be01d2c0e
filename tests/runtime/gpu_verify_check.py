"""GPU check of runtime/verify.py (not collected by pytest): runs on CUDA, no op syncs the host (sync debug
mode "error"), the Triton path draws the same tokens as the torch reference, and the time of one draft sampling +
verification for a Qwen3-sized vocabulary, per sampling configuration.
Run: python3 tests/runtime/gpu_verify_check.py  (needs `pip install -e .`; bench/sampler.py times the sampler alone)

Before issue 18 (one H200, torch 2.11+cu130, 2026-11-29, N=64 k=8 V=151936, GPU time): greedy 0.71 ms; temperature
0.6: 2.80 ms; + top_p 0.95: 21.86 ms (full vocabulary sort); + top_k 20 + top_p 0.95, seeded: 5.64 ms (torch.topk)."""
import time

import torch

from sparsespec_compile.kernels import sampling_reference as ref
from sparsespec_compile.kernels.sampling_triton import residual, sample_rows
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.verify import Drafts, PositionSeed, SamplingTensors, rejection_sample, sample

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


def race_gap(x: torch.Tensor, st: SamplingTensors, seeds: torch.Tensor) -> torch.Tensor:
    """Per row, the reference race's winning key minus the runner-up's: a row whose tokens differ between the two
    paths with a gap of ~1e-6 (an ulp of a key ~10) is rounding (GPU exp/log/division vs torch's); a larger gap is
    a bug."""
    l, m, tau, z = ref.thresholds(x, st.inv_temp, st.top_k, st.top_p, st.greedy)
    u = ref.uniform(seeds, torch.arange(x.shape[-1], device=x.device).expand_as(l))
    top2 = torch.where(l >= tau[:, None], l - (-u.log()).log(), float("-inf")).topk(2, -1).values
    return top2[:, 0] - top2[:, 1]


def stages(p: SamplingParams) -> list[str]:
    """Each kernel against the reference on the same inputs (the seeds rejection_sample draws from generator 1,
    the reference's stats where a kernel reads stats): what differs, in how many rows, by what margin."""
    out = []
    g = torch.Generator(device=dev).manual_seed(1)
    dseed = torch.randint(0, 1 << 62, (N * k,), generator=g, device=dev)  # noise_seeds' draws, in its order
    vseed = torch.randint(0, 1 << 62, (N * (k + 1),), generator=g, device=dev)
    for what, x, seeds in (("draft sample", draft, dseed), ("target sample", target, vseed)):
        st = SamplingTensors.build(p, x.shape[0], V, dev)
        tok, sts = sample_rows(x, torch.arange(x.shape[0], device=dev), st.inv_temp, st.top_k, st.top_p, st.greedy,
                               seeds)
        tok_r, sts_r = ref.sample_rows_reference(x, st.inv_temp, st.top_k, st.top_p, st.greedy, seeds)
        bad = (tok != tok_r).nonzero().flatten()
        gaps = race_gap(x[bad], SamplingTensors.build(p, len(bad), V, dev), seeds[bad]) if len(bad) else bad
        out.append(f"{what}: {len(bad)}/{x.shape[0]} rows differ (reference race gaps {gaps.tolist()[:8]}), "
                   f"tau equal {bool(torch.equal(sts[:, 1], sts_r[:, 1]))}, z max rel diff "
                   f"{float(((sts[:, 2] - sts_r[:, 2]).abs() / sts_r[:, 2]).max()):.1e}")
        if what == "draft sample":
            q_r = sts_r
        else:
            t_r = sts_r
    # residual of slot 0 of every request, both from the reference's stats: exact same fp32 inputs
    st = SamplingTensors.build(p, N, V, dev)
    t_rows, d_rows = torch.arange(N, device=dev) * (k + 1), torch.arange(N, device=dev) * k
    need = torch.ones(N, dtype=torch.bool, device=dev)
    got = residual(target, t_rows, t_r[t_rows], draft, d_rows, q_r[d_rows], st.inv_temp, vseed[t_rows], need,
                   torch.full((N,), -1, device=dev))
    want = ref.residual_reference(target[t_rows], t_r[t_rows], draft[d_rows], q_r[d_rows], st.inv_temp,
                                  vseed[t_rows])
    out.append(f"residual (same inputs): {int((got != want).sum())}/{N} rows differ, out of range "
               f"{int(((got < 0) | (got >= V)).sum())}")
    return out


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
    if not (torch.equal(first[0], d) and torch.equal(first[1][1], out[1])):
        diag = stages(p) if seeds is None else ["(seeded rows: run the unseeded configs' stages)"]
        raise AssertionError(f"{name}: triton != reference: draft tokens differ in "
                             f"{int((first[0] != d).sum())}/{N * k}, accepted in {int((first[1][0] != out[0]).sum())}"
                             f"/{N}, emitted tokens in {int((first[1][1] != out[1]).any(1).sum())}/{N} requests\n  "
                             + "\n  ".join(diag))
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
