"""The Hugging Face baselines: eager ``generate`` and the static-cache + ``torch.compile`` path."""

from __future__ import annotations

import time

import torch

from .common import graph_count, sync


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
            sync(device)
            warmup = time.perf_counter() - t
            torch.manual_seed(0)
            graphs = graph_count()
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            sync(device)
            seconds = time.perf_counter() - t
            graphs = graph_count() - graphs
    finally:
        for name in _HF_LEFTOVERS:
            model.__dict__.pop(name, None)
    tokens = out[:, ids.shape[1]:].tolist()
    if any(len(t) != max_new for t in tokens):
        raise RuntimeError(f"HF generate stopped early: {[len(t) for t in tokens]} of {max_new} tokens")
    return {"tokens": tokens, "seconds": seconds, "warmup_seconds": warmup, "steps": max_new,
            "graphs_compiled_in_timed_run": graphs}
