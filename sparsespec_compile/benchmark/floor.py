"""The bytes-moved floor of a decode step: measured copy bandwidth, weight bytes, KV bytes read."""

from __future__ import annotations

import math
import time

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter under tensor parallelism (a DTensor's local shard; a plain tensor as is)."""
    return t.to_local() if hasattr(t, "to_local") else t


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
    """Bytes of weights one forward reads on this rank: every parameter once (shared ones, tied embeddings, counted
    once), except an untied input embedding table, of which a step gathers only the rows of its tokens. Under tensor
    parallelism, this rank's shards (a replicated parameter counts whole on every rank)."""
    seen, total = set(), 0
    for p in map(local, model.parameters()):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    emb_w = local(emb.weight) if emb is not None else None
    if emb_w is not None and (out is None or local(out.weight).data_ptr() != emb_w.data_ptr()):
        total -= emb_w.numel() * emb_w.element_size()
    return total


def kv_bytes_per_token(model, world: int = 1) -> int:
    """K and V of one token over every layer on one rank: 2 * layers * kv_heads / world * head_dim * element size
    (tensor parallelism splits the KV heads over the ranks)."""
    from ..runtime.kv_cache import kv_shape_from_config

    layers, kv_heads, head_dim = kv_shape_from_config(model.config)
    return 2 * layers * (kv_heads // world) * head_dim * next(model.parameters()).element_size()


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
