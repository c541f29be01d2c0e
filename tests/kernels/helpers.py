"""Random paged ragged batches for the kernel tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# ‖out - ref‖ / ‖ref‖ bounds (and elementwise atol) per dtype.
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


@dataclass
class Batch:
    q: torch.Tensor  # [T, Hq, D] (a non-contiguous view, like the op's)
    k_cache: torch.Tensor  # [num_pages, P, Hkv, D]
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor  # [R+1] int32
    seq_lens: torch.Tensor  # [R] int32
    block_tables: torch.Tensor  # [R, max_pages] int32
    max_query_len: int
    max_seq_len: int
    scale: float

    def meta(self) -> dict:
        return dict(query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, block_tables=self.block_tables)

    def context(self, r: int, cache: torch.Tensor) -> torch.Tensor:
        """[L, Hkv, D] of request r in logical order."""
        L, P = int(self.seq_lens[r]), cache.shape[1]
        pos = torch.arange(L)
        return cache[self.block_tables[r, pos // P].long(), pos % P]


def make_batch(specs, Hq, Hkv, D, page_size, dtype, seed=0, pad_tokens=0, device="cpu") -> Batch:
    """specs: [(q_len, seq_len)], q_len <= seq_len. Pages are shuffled so block tables are not the identity."""
    g = torch.Generator().manual_seed(seed)
    npages = [math.ceil(L / page_size) for _, L in specs]
    total = sum(npages) + 2
    perm = torch.randperm(total, generator=g)
    maxp = max(max(npages), 1) + 1
    bt = torch.zeros(len(specs), maxp, dtype=torch.int32)
    off = 0
    for r, n in enumerate(npages):
        bt[r, :n] = perm[off : off + n].int()
        bt[r, n:] = perm[-1]  # junk pages past the end must never be read as context
        off += n
    kc = torch.randn(total, page_size, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(total, page_size, Hkv, D, generator=g).to(dtype)
    qlens = [n for n, _ in specs]
    T = sum(qlens) + pad_tokens
    q = torch.randn(1, Hq, T, D, generator=g).to(dtype).transpose(1, 2)[0]  # [T, Hq, D] strided view
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0).tolist()), dtype=torch.int32)
    return Batch(q.to(device), kc.to(device), vc.to(device), qsl.to(device),
                 torch.tensor([L for _, L in specs], dtype=torch.int32, device=device), bt.to(device),
                 max(qlens), max(L for _, L in specs), 1.0 / math.sqrt(D))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
