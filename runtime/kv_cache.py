"""Allocation of the device-side pools the attention op reads: the paged K/V cache and the PillarStore.

Bookkeeping of which page belongs to whom is ``block_allocator.py`` (torch-free); this file only sizes and
allocates tensors in the layout ``context.py`` defines. The host (pinned) offload pool is ``offload.py``.
"""

from __future__ import annotations

import torch

from sparsespec_compile.context import PagedKVCache, PillarStore


def kv_shape_from_config(config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a Hugging Face text config (``config.get_text_config()`` first
    for multimodal wrappers). ``head_dim`` may be absent (then hidden_size / num_attention_heads)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def page_bytes(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page costs across all layers, K and V (SmolLM2-135M, bf16: 30·3·64·2·2 = 22.5 KiB per token)."""
    return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device | str) -> int:
    """Free memory now: CUDA's ``mem_get_info`` (after the weights are loaded), else Linux MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError(f"cannot measure free memory on {device}: pass num_pages explicitly")


def num_pages_for(memory_fraction: float, bytes_per_page: int, device: torch.device | str) -> int:
    if not (0.0 < memory_fraction <= 1.0):
        raise ValueError(f"kv memory_fraction must be in (0, 1], got {memory_fraction}")
    return int(free_memory_bytes(device) * memory_fraction) // bytes_per_page


def pages_for_requests(max_num_seqs: int, max_model_len: int, stride: int, page_size: int) -> int:
    """Pages that ``max_num_seqs`` requests of ``max_model_len`` tokens can ever hold at once (+ one verify chunk
    of ``stride + 1`` tokens past the end each): more is never used without oversubscription."""
    return max_num_seqs * -(-(max_model_len + stride + 1) // page_size)


def allocate_kv_cache(num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                      device: torch.device | str, page_size: int = 16, num_pages: int | None = None,
                      memory_fraction: float = 0.9, max_pages: int | None = None) -> PagedKVCache:
    """Pools ``k[layer], v[layer]: [num_pages, page_size, num_kv_heads, head_dim]``.

    ``num_pages`` explicit, or ``memory_fraction`` of the device's *free* memory (measured now, so call this after
    the weights and a warm-up forward have taken theirs), at most ``max_pages`` (what the requests can need:
    ``pages_for_requests``; without it a 2-layer toy model on a CPU took 1.49 M zero-filled pages, 11.4 GiB).
    Raises ``ValueError`` when not even one page fits.
    """
    for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                      ("page_size", page_size)):
        if val < 1:
            raise ValueError(f"allocate_kv_cache: {name} must be >= 1, got {val}")
    per_page = page_bytes(num_layers, num_kv_heads, head_dim, page_size, dtype)
    if num_pages is None:
        num_pages = num_pages_for(memory_fraction, per_page, device)
        if max_pages is not None:
            num_pages = min(num_pages, max_pages)
    if num_pages < 1:
        raise ValueError(f"KV cache: no page fits ({per_page} bytes per page, fraction {memory_fraction} of free "
                         f"memory on {device}); free memory or pass num_pages")
    # One allocation, one view per layer (each contiguous). Zero-filled rather than empty: a padded lane that
    # reads a never-written slot must see finite numbers, or 0 * NaN poisons the softmax sum.
    pool = torch.zeros(2, num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    return PagedKVCache(k=list(pool[0].unbind(0)), v=list(pool[1].unbind(0)), page_size=page_size)


def allocate_pillar_store(num_layers: int, max_slots: int, num_kv_heads: int, max_budget: int,
                          device: torch.device | str) -> PillarStore:
    """``indices [num_layers, max_slots, num_kv_heads, max_budget]`` int32, ``lengths [max_slots]`` int32 (0: no
    pillars yet). A request owns slot ``Request.pillar_slot`` (handed out by the scheduler) while admitted."""
    if min(num_layers, max_slots, num_kv_heads, max_budget) < 1:
        raise ValueError(f"allocate_pillar_store: every size must be >= 1, got layers={num_layers} "
                         f"slots={max_slots} kv_heads={num_kv_heads} max_budget={max_budget}")
    return PillarStore(
        indices=torch.zeros(num_layers, max_slots, num_kv_heads, max_budget, dtype=torch.int32, device=device),
        lengths=torch.zeros(max_slots, dtype=torch.int32, device=device),
        recall=torch.zeros(num_layers, max_slots, dtype=torch.float32, device=device),
    )


def slot_mapping(block_table: list[int], positions: range, page_size: int) -> list[int]:
    """Flat slots of ``positions`` of one request (``ForwardContext.slot_mapping``; host lists, one H2D copy)."""
    return [block_table[p // page_size] * page_size + p % page_size for p in positions]
