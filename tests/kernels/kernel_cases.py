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


def make_sparse(b: Batch, sparse_rows, Hkv: int, bmax: int, seed=0, cover_all=False):
    """PillarAttn metadata for the rows in ``sparse_rows``: draft_start in [0, first query position], a random
    sorted pillar subset of [0, draft_start) per KV head (all of it with ``cover_all``)."""
    g = torch.Generator().manual_seed(seed + 1)
    R = b.seq_lens.shape[0]
    qsl = b.query_start_loc.tolist()
    is_sparse = torch.zeros(R, dtype=torch.bool)
    ds = torch.zeros(R, dtype=torch.int32)
    idx = torch.zeros(R, Hkv, bmax, dtype=torch.int32)
    lens = torch.zeros(R, dtype=torch.int32)
    for r in sparse_rows:
        L, n = int(b.seq_lens[r]), qsl[r + 1] - qsl[r]
        first = L - n
        d = first if cover_all else int(torch.randint(0, first + 1, (1,), generator=g))
        m = d if cover_all else int(torch.randint(0, min(d, bmax) + 1, (1,), generator=g))
        assert m <= bmax
        for h in range(Hkv):
            sel = torch.randperm(d, generator=g)[:m].sort().values if not cover_all else torch.arange(d)
            idx[r, h, :m] = sel.int()
            idx[r, h, m:] = int(torch.randint(0, 1000, (1,), generator=g))  # junk past the length
        is_sparse[r], ds[r], lens[r] = True, d, m
    dev = b.q.device
    return dict(is_sparse=is_sparse.to(dev), draft_start=ds.to(dev), pillar_indices=idx.to(dev),
                pillar_lengths=lens.to(dev))


def request_masks(b: Batch, r: int, Hq: int, Hkv: int, sliding_window=-1, sparse=None):
    """[Hq, n, L] attend mask of request r, built the slow, obvious way."""
    qsl = b.query_start_loc.tolist()
    L, n = int(b.seq_lens[r]), qsl[r + 1] - qsl[r]
    G = Hq // Hkv
    mask = torch.zeros(Hq, n, L, dtype=torch.bool)
    for h in range(Hq):
        allowed = set(range(L))
        if sparse is not None and bool(sparse["is_sparse"][r]):
            m = int(sparse["pillar_lengths"][r])
            allowed = set(sparse["pillar_indices"][r, h // G, :m].tolist()) | set(
                range(int(sparse["draft_start"][r]), L))
        for i in range(n):
            p = L - n + i
            for t in allowed:
                if t <= p and (sliding_window <= 0 or t > p - sliding_window):
                    mask[h, i, t] = True
    return mask
