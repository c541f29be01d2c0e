"""Host -> device copies on the step path that never wait for the device."""

from __future__ import annotations

import torch


def to_device(x, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list (made a ``dtype`` tensor) or CPU tensor on ``device``, non-blocking. On CUDA it goes through pinned
    memory: a copy from pageable memory may wait for the stream (CUDA stages it), which would stall the host behind
    the device and break overlap. The caching host allocator keeps the pinned block until the copy is done."""
    t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)
    return pinned_for(t, device).to(device, non_blocking=True)


def pinned_for(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` in pinned memory when it is headed for a CUDA device (a source for ``copy_(..., non_blocking=True)``)."""
    return t.pin_memory() if torch.device(device).type == "cuda" else t
