"""The benchmark under ``torchrun`` (tensor parallelism): one process per GPU, each with its shard of the model.

Every rank runs every cell (the model's collectives need all of them), rank 0 alone prints and writes, and every
decision that depends on a rank's own clock (the time budget) is rank 0's, broadcast, so that no rank skips a cell
the others run (that would hang them in the next collective).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: str) -> torch.device:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU) and pick this rank's device."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return dev


def rank0_decides(value):
    """Rank 0's ``value`` on every rank (identity in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (a DTensor's local shard; a plain tensor as is)."""
    return t.to_local() if hasattr(t, "to_local") else t
