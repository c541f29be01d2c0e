"""Argument checks shared by the kernel dispatchers: a clear ``ValueError`` at the API boundary."""

from __future__ import annotations

import os

import torch

IMPLS = ("reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_impl(impl: str, *tensors: torch.Tensor) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and not interpreting():
        for t in tensors:
            if t is not None and t.device.type != "cuda":
                raise ValueError(
                    f"impl='triton' needs CUDA tensors (got one on {t.device}); use impl='reference' on CPU "
                    "or set TRITON_INTERPRET=1 before importing triton"
                )


def check_tensor(name: str, t: torch.Tensor, *, ndim: int, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the cache is on {device}: all tensors must share a device")


def check_cache(name: str, cache: torch.Tensor) -> None:
    check_tensor(name, cache, ndim=4, dtypes=FLOAT_DTYPES)
    if cache.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1), got strides {cache.stride()}")
    if cache.stride(0) != cache.shape[1] * cache.stride(1):
        raise ValueError(f"{name} pages must be laid out back to back (stride(0) == page_size * stride(1)), "
                         f"got strides {cache.stride()}")


def check_paged_metadata(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, query_start_loc: torch.Tensor,
                         seq_lens: torch.Tensor, block_tables: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Checks q/k/v caches and the ragged-batch metadata; returns (T, Hq, Hkv, D, R)."""
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache {tuple(v_cache.shape)} "
                         f"{v_cache.dtype} must match")
    dev = k_cache.device
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in head_dim, got strides {q.stride()}")
    T, Hq, D = q.shape
    _, _, Hkv, Dk = k_cache.shape
    if D != Dk:
        raise ValueError(f"q head_dim {D} != cache head_dim {Dk}")
    if Hq % Hkv != 0:
        raise ValueError(f"number of query heads {Hq} must be a multiple of the KV heads {Hkv}")
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32, torch.int64), device=dev)
    R = seq_lens.shape[0]
    if query_start_loc.shape[0] != R + 1:
        raise ValueError(f"query_start_loc must have R + 1 = {R + 1} entries, got {query_start_loc.shape[0]}")
    if block_tables.shape[0] != R:
        raise ValueError(f"block_tables must have R = {R} rows, got {block_tables.shape[0]}")
    return T, Hq, Hkv, D, R


def check_sparse_metadata(R: int, Hkv: int, dev, is_sparse, draft_start, pillar_indices, pillar_lengths,
                          pillar_rows=None) -> bool:
    """Returns True when sparse rows are possible (``is_sparse`` given)."""
    if is_sparse is None:
        return False
    if draft_start is None or pillar_indices is None or pillar_lengths is None:
        raise ValueError("is_sparse needs draft_start, pillar_indices and pillar_lengths too")
    check_tensor("is_sparse", is_sparse, ndim=1, dtypes=(torch.bool,), device=dev)
    check_tensor("draft_start", draft_start, ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
    check_tensor("pillar_indices", pillar_indices, ndim=3, dtypes=(torch.int32, torch.int64), device=dev)
    check_tensor("pillar_lengths", pillar_lengths, ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
    if is_sparse.shape[0] != R or draft_start.shape[0] != R:
        raise ValueError(f"is_sparse and draft_start must have R = {R} entries")
    S = R  # rows of pillar_indices / pillar_lengths: one per request, or any count addressed through pillar_rows
    if pillar_rows is not None:
        check_tensor("pillar_rows", pillar_rows, ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
        if pillar_rows.shape[0] != R:
            raise ValueError(f"pillar_rows must have R = {R} entries, got {pillar_rows.shape[0]}")
        S = pillar_indices.shape[0]
    if pillar_lengths.shape[0] != S:
        raise ValueError(f"pillar_lengths must have {S} entries (one per pillar_indices row), got {pillar_lengths.shape[0]}")
    if pillar_indices.shape[0] != S or pillar_indices.shape[1] != Hkv:
        raise ValueError(f"pillar_indices must be [{S}, Hkv={Hkv}, Bmax], got {tuple(pillar_indices.shape)}")
    if pillar_indices.stride(-1) != 1:
        raise ValueError("pillar_indices must be contiguous in its last dim")
    return True
