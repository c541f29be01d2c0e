"""The benchmark driver: one timed cell per (method, batch, output length, temperature) on the model of models.py,
the greedy comparisons, the command line (``main``)."""

from __future__ import annotations

import datetime
import gc
import json
import math
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from .args import parse_args
from .common import log_runtime_to_stderr
from .common import (COUNTERS, DRAFT_OF, HF_METHODS, LIST_COUNTERS, METHODS, PNG_NAME, SPEC_METHODS,
                     clear, graph_count, sync)
from .floor import (floor_seconds, kv_bytes_per_token, measure_copy_bandwidth, plain_kv_tokens_read,
                    spec_kv_tokens_read, weight_bytes)
from ..runtime.parallel import from_rank0, join_torchrun
from .agreement import add_comparisons
from .hf import run_hf
from .models import build_model, load_prompts, max_positions
from .recall import recall_vs_acceptance
from .report import add_speedups, markdown_table, plot_results, write_json


# ---- the bytes-moved floor ------------------------------------------------------------------------------------
def stats_delta(before: dict, after: dict) -> dict:
    """``llm.stats()`` of the timed generate alone (the warm-up's steps are in ``before``): counters subtracted,
    per-cycle means re-weighted by the cycles of each run."""
    d = dict(after)
    for key in COUNTERS:
        if isinstance(after.get(key), (int, float)):
            d[key] = after[key] - (before.get(key) or 0)
    c0, c1 = before.get("cycles", 0), after.get("cycles", 0)
    cycles = c1 - c0
    if "mean_accepted" in after:
        d["mean_accepted"] = ((after["mean_accepted"] * c1 - before.get("mean_accepted", 0.0) * c0) / cycles
                              if cycles else 0.0)
    if "per_position_acceptance" in after:
        b = before.get("per_position_acceptance") or [0.0] * len(after["per_position_acceptance"])
        d["per_position_acceptance"] = [(x * c1 - y * c0) / cycles if cycles else 0.0
                                        for x, y in zip(after["per_position_acceptance"], b)]
    for key in LIST_COUNTERS:
        if isinstance(after.get(key), list):
            b = before.get(key) or [0] * len(after[key])
            d[key] = [x - y for x, y in zip(after[key], b)]
    if "cycles_by_k" in d:
        n = sum(d["cycles_by_k"])
        d["mean_k"] = sum(j * c for j, c in enumerate(d["cycles_by_k"])) / n if n else 0.0
        d["per_position_acceptance_all"] = [a / t if t else 0.0
                                            for a, t in zip(d["position_accepted"], d["position_drafted"])]
    if d.get("recall_verifies"):
        d["recall_by_layer"] = [x / d["recall_verifies"] for x in d["recall_sum_by_layer"]]
        d["mean_recall"] = sum(d["recall_by_layer"]) / len(d["recall_by_layer"])
    elif "recall_verifies" in d:
        d["recall_by_layer"], d["mean_recall"] = [], None
    if d.get("steps"):  # the ratios of the timed run's own counters (the lifetime's include the warm-up)
        d["tokens_per_step"] = d.get("output_tokens", 0) / d["steps"]
        if "request_steps" in d:
            d["mean_requests_per_step"] = d["request_steps"] / d["steps"]
            d["tokens_per_request_step"] = d.get("output_tokens", 0) / d["request_steps"] if d["request_steps"] else 0.0
    if d.get("seconds"):
        d["tokens_per_s"] = d.get("output_tokens", 0) / d["seconds"]
        if d.get("gpu_busy_seconds"):  # the runtime's own definition (step loop time), over the timed run only
            d["idle_fraction"] = 1.0 - d["gpu_busy_seconds"] / d["seconds"]
    return d


def runtime_config(method: str, args, batch: int, prompts: list[list[int]], output_len: int):
    from .. import SparseSpecConfig

    stride = 0 if method == "stride0" else args.stride
    # KV pages for the whole context of `batch` requests at once (+ a verify chunk's overshoot): nothing is
    # preempted; with more requests than slots, a finished request's pages go to the next one.
    per_request = sorted((-(-(len(p) + output_len + stride + 2) // args.page_size) for p in prompts), reverse=True)
    pages = sum(per_request[:batch]) + 16
    if args.kv_pool_fraction < 1.0:  # oversubscribed: the pool holds this share of the demand (at least one
        # request), and the dynamic KV cache offloads whole requests to the host pool when it runs short
        pages = max(math.ceil(args.kv_pool_fraction * sum(per_request[:batch])), per_request[0])
    return SparseSpecConfig(
        stride=stride, adaptive=method == "sparsespec", draft=DRAFT_OF[method], sparsity=args.sparsity, min_budget=args.min_budget,
        recent=min(args.recent, args.min_budget), compiler=args.compiler, page_size=args.page_size, num_pages=pages,
        max_num_seqs=batch, max_num_batched_tokens=max(args.max_num_batched_tokens, stride + 1),
        **({"cuda_graphs": args.cuda_graphs} if args.cuda_graphs else {}),  # else the config's default
        overlap={"auto": None, "on": True, "off": False}[args.overlap],
        fuse_projections=args.fuse_projections, hybrid_split=args.hybrid_split,
        log_stats_interval=args.log_stats_s,
    )


def run_runtime(model, prompts, method: str, batch: int, output_len: int, temperature: float, args, device) -> dict:
    from .. import LLM, SamplingParams

    cfg = runtime_config(method, args, batch, prompts, output_len)
    sampling = dict(temperature=temperature, top_p=args.top_p if temperature > 0 else 1.0, ignore_eos=True)
    llm = LLM(model, cfg)
    try:
        t = time.perf_counter()
        # Warm-up on the whole batch: compiles the graph and captures the short-context step shapes; a longer
        # context's sequence-length bucket is captured when first met (its time is reported, not counted).
        warm = min(output_len, args.warmup_tokens)
        gate = llm.engine.gate
        if gate is not None:  # warm-ups draft the full stride (LLM.warming_up); a round long, so the speculative
            # shapes of the contexts a first round reaches are compiled and captured too
            warm = min(output_len, max(warm, gate.round_steps))
        with llm.warming_up():
            llm.generate(prompts, SamplingParams(max_tokens=warm, **sampling), use_tqdm=False)
        sync(device)
        warmup = time.perf_counter() - t
        runs = []
        # The heap the compile and warm-up left is frozen, as vLLM and SGLang do after start-up: a timed run's
        # collections then skip the compiler's and the graphs' objects, not part of what a step costs.
        gc.collect()
        gc.freeze()
        try:
            for _ in range(max(1, args.repeats)):
                before = llm.stats()
                torch.manual_seed(0)
                graphs = graph_count()
                t = time.perf_counter()
                outs = llm.generate(prompts, SamplingParams(max_tokens=output_len, **sampling), use_tqdm=False)
                sync(device)
                seconds = time.perf_counter() - t
                stats = stats_delta(before, llm.stats())
                runs.append(dict(outs=outs, seconds=seconds, stats=stats, graphs=graph_count() - graphs))
        finally:
            gc.unfreeze()
    finally:
        del llm
    for run in runs:
        errors = sorted({o.finish_reason for o in run["outs"] if o.finish_reason.startswith("error")})
        if errors:
            raise RuntimeError(f"{len(errors)} request error(s): {errors[:3]}")
    # --repeats: the median repeat (by its time less its graph captures) is the cell's figure; every repeat's time
    # is kept, so a ratio can be read against the spread of identical runs
    net = [r["seconds"] - (r["stats"].get("capture_seconds") or 0.0) for r in runs]
    med = sorted(range(len(runs)), key=net.__getitem__)[(len(runs) - 1) // 2]
    run = runs[med]
    return {"tokens": [list(o.token_ids) for o in run["outs"]], "seconds": run["seconds"], "warmup_seconds": warmup,
            "stats": run["stats"], "metrics": [o.metrics for o in run["outs"]], "config": cfg,
            "graphs_compiled_in_timed_run": run["graphs"], "repeat_seconds": net, "repeat_used": med}


def run_cell(model, prompts, method: str, batch: int, output_len: int, temperature: float, args, ctx: dict) -> dict:
    """One timed run; returns its record (``tokens`` kept for the greedy comparisons, dropped from the JSON unless
    ``--save-tokens``)."""
    device = ctx["device"]
    hf = method in HF_METHODS
    if hf:  # HF generate runs one batch: the first `batch` prompts (its tokens/s is per that batch)
        prompts = prompts[:batch]
    prompt_lens = [len(p) for p in prompts]
    rec: dict[str, Any] = {"method": method, "batch": batch, "requests": len(prompts), "output_len": output_len,
                           "temperature": temperature,
                           "prompt_len_mean": sum(prompt_lens) / len(prompt_lens), "prompt_len_max": max(prompt_lens)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generated = min(args.hf_max_tokens, output_len) if hf else output_len
    rec["generated_per_request"] = generated
    if hf:
        r = run_hf(model, prompts, method, generated, temperature, args.top_p, device)
        steps, stats = r["steps"], {}
        kv_read, kv_source = plain_kv_tokens_read(prompt_lens, generated), "estimated"
    else:
        r = run_runtime(model, prompts, method, batch, output_len, temperature, args, device)
        stats, steps = r["stats"], r["stats"]["steps"]
        if stats.get("kv_tokens_read") is not None:
            kv_read, kv_source = stats["kv_tokens_read"], "runtime"
        elif method == "stride0":
            kv_read, kv_source = plain_kv_tokens_read(prompt_lens, generated), "estimated"
        else:
            kv_read = sum(spec_kv_tokens_read(p, len(t), m["accepted"], m["drafted"], r["config"])
                          for p, t, m in zip(prompt_lens, r["tokens"], r["metrics"]))
            kv_source = "estimated from per-request cycles"
    out_tokens = sum(map(len, r["tokens"]))
    # CUDA-graph captures of shapes first met in the timed run (the context outgrowing a sequence-length bucket)
    # are a one-off per process, like the compiles the warm-up absorbs: left out of the time, reported beside it.
    capture = stats.get("capture_seconds") or 0.0
    seconds = r["seconds"] - capture
    floor = floor_seconds(steps, kv_read, ctx["weight_bytes"], ctx["kv_bytes_per_token"], ctx["bandwidth"])
    rec.update(
        status="ok", seconds=seconds, wall_seconds=r["seconds"], capture_seconds_in_timed_run=capture,
        warmup_seconds=r["warmup_seconds"], output_tokens=out_tokens, tokens_per_s=out_tokens / seconds,
        steps=steps, step_ms=1e3 * seconds / steps if steps else None,
        kv_tokens_read=kv_read, kv_tokens_read_source=kv_source, floor_seconds=floor,
        floor_step_ms=1e3 * floor / steps if steps else None, floor_fraction=floor / seconds,
        mean_accepted=stats.get("mean_accepted") if not hf and method != "stride0" else None,
        per_position_acceptance=stats.get("per_position_acceptance") if method in SPEC_METHODS else None,
        # every cycle, whatever its k (the adaptive stride's cycles are rarely full): k chosen, acceptance by position
        mean_k=stats.get("mean_k") if not hf else None,
        cycles_by_k=stats.get("cycles_by_k") if not hf else None,
        per_position_acceptance_all=stats.get("per_position_acceptance_all") if method in SPEC_METHODS else None,
        tokens_per_step=out_tokens / steps if steps else None,
        per_request_tokens_per_step=None if hf else [m.get("tokens_per_step") for m in r["metrics"]],
        per_request_mean_k=None if hf else [m.get("mean_k") for m in r["metrics"]],
        cycles=stats.get("cycles"), mean_requests_per_step=stats.get("mean_requests_per_step"),
        kv_pool_fraction=None if hf else args.kv_pool_fraction,
        kv_pages=r["config"].num_pages if not hf else None,
        offloads=None if hf else sum(m.get("offloads", 0) for m in r["metrics"]),
        preemptions=None if hf else sum(m.get("preemptions", 0) for m in r["metrics"]),
        stride=0 if hf or method == "stride0" else args.stride,
        per_request_accepted=None if hf or method == "stride0" else accepted_spread(r["metrics"]),
        # draft recall per layer (scored drafts: pillar, hybrid, sparsespec) and how well it predicts acceptance
        mean_recall=stats.get("mean_recall"), recall_by_layer=stats.get("recall_by_layer") or None,
        per_request_recall=None if hf else [m.get("mean_recall") for m in r["metrics"]],
        recall_vs_acceptance=None if hf else recall_vs_acceptance(r["metrics"], args.stride),
        gpu_busy_seconds=stats.get("gpu_busy_seconds"), graph_steps=stats.get("graph_steps"),
        idle_fraction=_idle_fraction(stats, seconds),
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        graphs_compiled_in_timed_run=r["graphs_compiled_in_timed_run"],
        repeat_tokens_per_s=None if hf else [out_tokens / x for x in r["repeat_seconds"]],
        cuda_graphs=stats.get("cuda_graphs"),
        stats=stats, tokens=r["tokens"],
    )
    if stats.get("graph_steps") and stats.get("graph_seconds"):
        # decode steps only (the graphed ones: no prefill chunk), what the step-floor target is about
        g_floor = floor_seconds(stats["graph_steps"], stats["graph_kv_tokens_read"], ctx["weight_bytes"],
                                ctx["kv_bytes_per_token"], ctx["bandwidth"])
        rec.update(decode_step_ms=1e3 * stats["graph_seconds"] / stats["graph_steps"],
                   decode_floor_step_ms=1e3 * g_floor / stats["graph_steps"],
                   decode_floor_fraction=g_floor / stats["graph_seconds"])
    return rec


def accepted_spread(metrics: list[dict]) -> dict | None:
    """Spread of the requests' own mean accepted lengths (full cycles): min, 10th percentile, median, max. A closed
    batch of equal-length requests runs until its slowest one is done, so the low end sets how many steps run
    with few requests (mean requests per step)."""
    means = sorted(m["mean_accepted"] for m in metrics if m.get("accepted"))
    if not means:
        return None
    n = len(means)
    return {"requests": n, "min": means[0], "p10": means[n // 10], "median": means[n // 2], "max": means[-1]}


def _idle_fraction(stats: dict, wall: float) -> float | None:
    """1 - GPU busy time / wall time of the timed generate, when the runtime measured busy time (CUDA events around
    each step's work; 0 = not measured, as on the CPU). None for HF and where nothing was measured."""
    if stats.get("gpu_busy_seconds") and wall > 0:
        return max(0.0, 1.0 - stats["gpu_busy_seconds"] / wall)
    return None


# ---- the whole run --------------------------------------------------------------------------------------------
def environment(args, device: torch.device, model_desc: str, bandwidth: float, argv: list[str]) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
        "python": platform.python_version(), "command": "sparsespec bench " + shlex.join(argv), "argv": sys.argv,
        "model": model_desc, "copy_bandwidth_bytes_per_s": bandwidth,
    }


def select_methods(args, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Methods to run and those left out with the reason (hf_static_compile by default on the CPU)."""
    if args.methods:
        return list(args.methods), {}
    if device.type != "cuda":
        return [m for m in METHODS if m != "hf_static_compile"], {
            "hf_static_compile": "CPU: mode='reduce-overhead' is CUDA graphs (name it in --methods to run it anyway)"}
    return list(METHODS), {}


def cells(args, methods: list[str]):
    """Cheapest first (short outputs, small batches), so a time budget cuts the expensive cells; within a
    (output length, batch, temperature) group the HF runs and stride 0 come before the speculative ones that are
    compared with them."""
    order = [m for m in METHODS if m in methods]
    for output_len in sorted(args.output_lens):
        for batch in sorted(args.batch_sizes):
            for temperature in args.temperature:
                for method in order:
                    yield output_len, batch, temperature, method


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.log_stats_s:
        log_runtime_to_stderr()
    rank, world, device = join_torchrun(args.device)
    lead = rank == 0  # the rank that prints and writes
    if world > 1 and not Path(args.model).is_dir():
        raise SystemExit(f"under torchrun (WORLD_SIZE={world}) --model must be a checkpoint directory, loaded with "
                         f"tp_plan='auto'; build one first: sparsespec bench --model {args.model} --save-model DIR")
    model, tok, desc = build_model(args.model, str(device), args.dtype, args.gguf, world)
    if args.save_model:
        model.save_pretrained(args.save_model)
        print(f"saved {desc} to {args.save_model}")
        return 0
    bandwidth = measure_copy_bandwidth(device)
    # under tensor parallelism: one rank's bytes (its weight shards and KV heads) against one GPU's bandwidth
    ctx = {"device": device, "bandwidth": bandwidth, "weight_bytes": weight_bytes(model),
           "kv_bytes_per_token": kv_bytes_per_token(model, world)}
    methods, skipped_methods = select_methods(args, device)
    if world > 1 and set(methods) & set(HF_METHODS):
        raise SystemExit(f"--methods {sorted(set(methods) & set(HF_METHODS))}: the HF baselines run in one process; "
                         "under torchrun name the runtime's methods only (stride0 pillar streaming)")
    limit = max_positions(model)
    result = {"environment": {**environment(args, device, desc, bandwidth, argv), "world_size": world},
              "prompts": None,
              "weight_bytes": ctx["weight_bytes"], "kv_bytes_per_token": ctx["kv_bytes_per_token"],
              "settings": {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items()},
              "skipped_methods": skipped_methods, "records": []}
    say = print if lead else (lambda *a, **k: None)
    say(f"{desc}; copy bandwidth {bandwidth / 1e12:.3f} TB/s; weights {ctx['weight_bytes'] / 2**20:.1f} MiB; "
          f"methods {methods}", flush=True)
    prompt_cache: dict[int, list[list[int]]] = {}
    groups: dict[tuple, dict[str, dict]] = {}
    for output_len, batch, temperature, method in cells(args, methods):
        if batch not in prompt_cache:
            prompt_cache[batch], result["prompts"] = load_prompts(args.prompts, tok, model.config.vocab_size, batch,
                                                                  args.prompt_len, args.seed,
                                                                  batch * args.requests_per_slot)
        prompts = prompt_cache[batch]
        base = {"method": method, "batch": batch, "output_len": output_len, "temperature": temperature}
        elapsed = from_rank0(time.perf_counter() - t_start)  # all ranks run a cell, or none
        if args.time_budget_s is not None and elapsed > args.time_budget_s:
            rec = {**base, "status": "skipped", "reason": f"time budget {args.time_budget_s:.0f} s spent "
                                                          f"({elapsed:.0f} s elapsed)"}
        elif limit and max(map(len, prompts)) + output_len + args.stride + 1 > limit:
            rec = {**base, "status": "skipped", "reason": f"longest prompt {max(map(len, prompts))} + output "
                                                          f"{output_len} exceeds max_position_embeddings {limit}"}
        else:
            clear(device)
            try:
                rec = run_cell(model, prompts, method, batch, output_len, temperature, args, ctx)
            except Exception as exc:  # one failed cell (OOM, a compile error) must not lose the others
                traceback.print_exc()
                rec = {**base, "status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
            clear(device)
        key = (batch, output_len, temperature)
        if not args.save_tokens:  # token ids are only needed within a group (the comparisons): free the others
            for done in [k for k in groups if k != key]:
                for r in groups.pop(done).values():
                    r.pop("tokens", None)
        group = groups.setdefault(key, {})
        group[method] = rec
        # the logit margins at a divergence need a forward of the model: a collective under TP, left out there
        add_comparisons(rec, group, model if world == 1 else None, prompts)
        result["records"].append(rec)
        say(json.dumps({k: v for k, v in rec.items() if k not in ("tokens", "stats")}, default=str), flush=True)
        if lead:
            write_json(result, args.out, args.save_tokens)
    add_speedups(result["records"])
    if not lead:
        return 0
    path = write_json(result, args.out, args.save_tokens)
    table = markdown_table(result)
    print("\n" + table)
    png = plot_results(result, args.out / PNG_NAME)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    if args.results_md:
        env = result["environment"]
        with args.results_md.open("a") as f:
            f.write(f"\n### End-to-end benchmark, {env['date']}, {env['device']}\n\nCommand:\n\n```\n"
                    f"{env['command']}\n```\n\n{table}")
        print(f"appended the table to {args.results_md}")
    return 0
