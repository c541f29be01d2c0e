"""Tensor parallelism (HF ``tp_plan="auto"`` under torchrun): what the runtime needs to know and to agree on.

Under TP every rank holds its shard of the heads, so the attention op sees the *local* heads and each rank's KV
pool and pillar store are sized for them. Every rank runs the same deterministic scheduler on the same inputs
(as SGLang's TP workers do); what could differ between ranks is sampling (unseeded generators, or float
differences in the gathered logits), so rank 0's sampled and verified tokens are broadcast every step and every
rank applies exactly the same update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_world_size(model: torch.nn.Module) -> int:
    """Size of the device mesh the model's parameters are sharded over (1 when not tensor-parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: no HF tensor parallelism either
        return 1
    for p in model.parameters():
        if isinstance(p, DTensor):
            return p.device_mesh.size()
    return 1


def local_kv_heads(kv_heads: int, world: int) -> int:
    if kv_heads % world:
        raise ValueError(
            f"tensor parallelism over {world} ranks needs num_key_value_heads ({kv_heads}) divisible by the world size"
        )
    return kv_heads // world


def agree_on_tokens(sampled: list[list[int]], world: int) -> list[list[int]]:
    """Rank 0's step results, on every rank (one small collective per step; no-op without TP)."""
    if world == 1 or not dist.is_initialized():
        return sampled
    box = [sampled]
    dist.broadcast_object_list(box, src=0)
    return box[0]
