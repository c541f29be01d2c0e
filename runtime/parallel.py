"""Tensor parallelism (HF ``tp_plan="auto"`` under torchrun): what the runtime needs to know and to agree on.

Under TP every rank holds its shard of the heads, so the attention op sees the *local* heads and each rank's KV
pool and pillar store are sized for them. Every rank runs the same deterministic scheduler on the same inputs
(as SGLang's TP workers do); what could differ between ranks is sampling (unseeded generators, or float
differences in the gathered logits), so rank 0's sampled and verified tokens are broadcast every step and every
rank applies exactly the same update.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def join_torchrun(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device) of a process started by ``torchrun``, after joining its process group
    (NCCL on CUDA, gloo on the CPU); (0, 1, ``device``) when not started by it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, torch.device(device)
    dev = torch.device("cpu")
    if device.startswith("cuda"):
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return dist.get_rank(), world, dev


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


def from_rank0(value, world: int | None = None):
    """Rank 0's ``value`` on every rank: the step's sampled tokens, or any decision a rank must not make alone (one
    small collective; ``value`` itself without TP). ``world`` defaults to the process group's size."""
    if not dist.is_initialized() or (world or dist.get_world_size()) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def drop_backward_hooks(model: torch.nn.Module) -> list[str]:
    """Remove module backward hooks; returns the names of the modules that had them.

    The runtime only runs inference, where a backward hook never fires. Dynamo cannot trace a module that has one
    (without compiled autograd), so it splits the forward there: transformers 5.17's ``tp_plan="auto"`` puts a
    gradient all-reduce hook on Qwen3's ``q_norm`` and ``k_norm``. The split lands inside each attention, whose
    layer then cannot be numbered, and with Inductor the attention frames fell back to eager (0 sparsespec ops on
    the H200, bench/RESULTS.md).
    """
    names = []
    for name, mod in model.named_modules():
        if mod._backward_hooks or mod._backward_pre_hooks:
            mod._backward_hooks.clear()
            mod._backward_pre_hooks.clear()
            mod._is_full_backward_hook = None
            names.append(name)
    return names


def tp_from_pretrained_kwargs() -> dict:
    """``from_pretrained`` keywords for HF tensor parallelism over the torchrun world: ``distributed_config`` where
    transformers has it (``tp_plan=`` alone is deprecated there), else ``tp_plan="auto"``."""
    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}
