"""Paged KV write: the new tokens' K and V into the page pools by slot mapping."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._validate import check_cache, check_impl, check_tensor
from .reference import write_kv_reference


@triton.jit
def _write_kv_kernel(
    k_cache, v_cache, k, v, slot_mapping,
    stride_cp, stride_co, stride_ch,  # cache: page, offset, head (head_dim contiguous)
    stride_kt, stride_kh, stride_vt, stride_vh,  # new k/v: token, head (head_dim contiguous)
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)  # one program per (token, KV head): a row of HEAD_DIM values
    h = tl.program_id(1)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot >= 0:  # -1 marks a padding token
        d = tl.arange(0, BLOCK_D)
        dm = d < HEAD_DIM
        dst = (slot // PAGE_SIZE) * stride_cp + (slot % PAGE_SIZE) * stride_co + h * stride_ch + d
        kk = tl.load(k + t * stride_kt + h * stride_kh + d, mask=dm)
        vv = tl.load(v + t * stride_vt + h * stride_vh + d, mask=dm)
        tl.store(k_cache + dst, kk.to(k_cache.dtype.element_ty), mask=dm)
        tl.store(v_cache + dst, vv.to(v_cache.dtype.element_ty), mask=dm)


def _write_kv_triton(k_cache, v_cache, k, v, slot_mapping) -> None:
    T, Hkv, D = k.shape
    if T == 0:
        return
    _write_kv_kernel[(T, Hkv)](
        k_cache, v_cache, k, v, slot_mapping,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        PAGE_SIZE=k_cache.shape[1], HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        num_warps=1 if D <= 64 else 2,
    )


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, impl: str = "triton") -> None:
    """Write ``k, v: [T, Hkv, D]`` (views allowed, head_dim contiguous) into ``k_cache, v_cache:
    [num_pages, page_size, Hkv, D]`` at ``slot_mapping: [T]`` int64 (slot = page * page_size + offset; -1 = skip).
    Mutates the caches in place; casts to the cache dtype."""
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have one shape")
    dev = k_cache.device
    check_tensor("k", k, ndim=3, device=dev)
    check_tensor("v", v, ndim=3, device=dev)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64, torch.int32), device=dev)
    if k.shape != v.shape or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [T, Hkv, D] with (Hkv, D) = "
                         f"{tuple(k_cache.shape[2:])} of the cache")
    if k.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k and v must be contiguous in head_dim, got strides {k.stride()} and {v.stride()}")
    check_impl(impl, k_cache)
    if impl == "reference":
        write_kv_reference(k_cache, v_cache, k, v, slot_mapping)
    else:
        _write_kv_triton(k_cache, v_cache, k, v, slot_mapping)
