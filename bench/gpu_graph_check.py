"""GPU check of the CUDA-graph step path on a SmolLM2-shaped Llama with random bf16 weights.

    python3 bench/gpu_graph_check.py --out $OUT [--runs NAME ...]

Each run: ``name  stride graphs compiler batch prompt_len max_tokens [on] [fuse]`` (on: host/device overlap;
fuse: ``fuse_projections=True``). Checks, in one process:

* graphs="on" replays exactly what graphs="pad" computes eagerly (same padded shapes, same kernels): the greedy
  tokens must be identical — any difference is a capture bug, not rounding;
* a speculative run against the stride-0 run of the same compiler and batch: first divergent position per
  request and the target model's top-1 / top-2 logit margin there (bf16: a (k+1)-token verify and a one-token
  decode round differently, so a near-tie may flip; reported, never forced);
* tokens/s, steps, GPU busy time and idle fraction, graphs captured and capture time, peak memory.
Writes ``graph_check.json`` incrementally (a run that hits the time limit still leaves the earlier ones).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig

RUNS = [
    "s0_pad_eager 0 pad eager 16 512 64",
    "s0_graph_eager 0 on eager 16 512 64",
    "s0_off_eager 0 off eager 16 512 64",
    "s0_graph_ind 0 on inductor 16 512 128",
    "k8_graph_ind 8 on inductor 16 512 128",
    "s0_graph_ind_b64 0 on inductor 64 2048 256",
    "k8_graph_ind_b64 8 on inductor 64 2048 256",
    "k8_graph_ind_b64_overlap 8 on inductor 64 2048 256 on",
]


def smollm2_shaped(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, rms_norm_eps=1e-5)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@torch.inference_mode()
def margin_at(model, prompt: list[int], tokens: list[int], pos: int) -> float:
    """Top-1 minus top-2 logit of the target model at output position ``pos`` (eager HF forward, bf16)."""
    ids = torch.tensor([prompt + tokens[:pos]], device="cuda")
    top = model(ids).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def profile_decode(llm, prompts: list[list[int]], out: Path, name: str, max_tokens: int, steps: int = 30) -> str:
    """Device time of ``steps`` decode steps (every prompt prefilled, then 20 graph steps), by kernel name, per step.

    Run it with graphs="pad": the same padded kernels, launched eagerly, so every kernel is its own profiler event
    (graph replays hide their kernels from some profiler versions)."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    from sparsespec_compile.runtime.request import Request, RequestState

    eng = llm.engine
    for p in prompts:
        eng.add_request(Request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    sched = eng.scheduler

    def prefilling() -> bool:
        return bool(sched.waiting) or any(r.state is RequestState.PREFILL for r in sched.running)

    while prefilling():  # a decode profile: every request past its prompt (else chunked prefill dominates it)
        eng.step()
    start = eng.stats.graph_steps
    while eng.stats.graph_steps < start + 20:  # a few cycles of every phase
        eng.step()
    tokens_before = eng.stats.forward_tokens
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    fwd_tokens = (eng.stats.forward_tokens - tokens_before) / steps
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            t = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)  # us
            by_name[e.name][0] += 1
            by_name[e.name][1] += t
    total = sum(v[1] for v in by_name.values())
    count = sum(v[0] for v in by_name.values())
    lines = [f"{name}: {steps} steps, {fwd_tokens:.1f} tokens/step, device {total / steps / 1e3:.3f} ms/step, "
             f"{count / steps:.0f} kernels/step",
             f"{'us/step':>9} {'n/step':>7} {'us/call':>8}  kernel"]
    for k, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]:
        lines.append(f"{t / steps:9.1f} {n / steps:7.1f} {t / max(n, 1):8.2f}  {k[:110]}")
    table = "\n".join(lines)
    (out / f"profile_{name}.txt").write_text(table)
    for r in list(sched.waiting) + list(sched.running):  # not drained: padded eager steps are slow
        sched.abort(r, "abort")
    while eng.has_unfinished():
        eng.step()
    return table


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--runs", nargs="*", default=RUNS)
    ap.add_argument("--profile", action="store_true", help="profile 30 decode steps of each run instead of timing")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = smollm2_shaped()
    g = torch.Generator().manual_seed(0)
    results: dict[str, dict] = {}
    tokens: dict[str, list[list[int]]] = {}
    prompts_by: dict[tuple[int, int], list[list[int]]] = {}
    for spec in args.runs:
        name, stride, graphs, compiler, batch, plen, ntok, *rest = spec.split()
        overlap, fuse = "on" in rest, "fuse" in rest
        stride, batch, plen, ntok = int(stride), int(batch), int(plen), int(ntok)
        prompts = prompts_by.setdefault((batch, plen), [torch.randint(10, 49000, (plen,), generator=g).tolist()
                                                        for _ in range(batch)])
        torch._dynamo.reset()
        t_build = time.perf_counter()
        llm = LLM(model, SparseSpecConfig(adaptive=False, stride=stride, compiler=compiler, cuda_graphs=graphs, min_budget=128,
                                          overlap=overlap, fuse_projections=fuse,
                                          num_pages=batch * (plen + ntok + 64) // 16 + 64, max_num_seqs=batch,
                                          max_num_batched_tokens=max(2048, batch * (stride + 1))))
        params = SamplingParams(max_tokens=ntok, ignore_eos=True)
        llm.generate(prompts[:2], SamplingParams(max_tokens=2 * (stride + 1) + 2, ignore_eos=True), use_tqdm=False)
        warm = time.perf_counter() - t_build
        if args.profile:
            print(name, profile_decode(llm, prompts, args.out, name, max(ntok, 60)), flush=True)
            continue
        llm.engine.reset_stats()  # count the timed run only
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        s = llm.stats()
        tokens[name] = [o.token_ids for o in outs]
        rec = {"spec": spec, "seconds": dt, "warmup_compile_seconds": warm,
               "tokens_per_s": sum(len(o.token_ids) for o in outs) / dt,
               "errors": sorted({o.finish_reason for o in outs if o.finish_reason.startswith("error")}),
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
               **{k: s[k] for k in ("steps", "graph_steps", "cuda_graphs", "capture_seconds", "gpu_busy_seconds",
                                    "idle_fraction", "mean_accepted", "cycles", "seconds")}}
        rec["step_ms"] = 1e3 * s["seconds"] / max(1, s["steps"])
        if s.get("graph_steps"):  # decode steps only: the prefill chunks (not graphed) are out of this figure
            rec["graph_step_ms"] = 1e3 * s["graph_seconds"] / s["graph_steps"]
        # exactness: graph replay == padded eager; any later run vs the first stride-0 run of the same compiler and
        # shape (stride-0 overlap must equal it exactly; a speculative or fused run may part at a bf16 near-tie)
        if graphs == "on" and f"s0_pad_{compiler}" in tokens and stride == 0 and batch == 16 and ntok <= 64:
            rec["identical_to_pad"] = tokens[name] == tokens[f"s0_pad_{compiler}"]
        base = next((n for n, r in results.items() if r["spec"].split()[1] == "0" and r["spec"].split()[3] == compiler
                     and r["spec"].split()[4:7] == spec.split()[4:7]), None)
        if base:
            divs = [first_divergence(a, b) for a, b in zip(tokens[base], tokens[name])]
            rec["vs"] = base
            rec["identical_requests"] = sum(d is None for d in divs)
            rec["divergences"] = [{"request": i, "position": d, "margin": margin_at(model, prompts[i], tokens[base][i], d)}
                                  for i, d in enumerate(divs) if d is not None][:8]
        results[name] = rec
        print(name, json.dumps(rec), flush=True)
        (args.out / "graph_check.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": results}, indent=1))
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
