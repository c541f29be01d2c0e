"""The host pool and copy engine (runtime/offload.py) against a plain reference: pages of every layer, K and V, and
pillar rows survive a round trip device -> host -> other device pages / other pillar slot, in chunks, whatever
the order of the host pages; plus the new SparseSpecConfig knobs."""

import pytest
import torch

from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.runtime.kv_cache import allocate_kv_cache, allocate_pillar_store
from sparsespec_compile.runtime.offload import HostKVPool, _runs, default_host_pages
from sparsespec_compile.runtime.request import Request
from sparsespec_compile.runtime.scheduler import SwapOp


def _pools(layers=3, pages=12, page=4, heads=2, dim=5, slots=4, budget=6, dtype=torch.float32):
    kv = allocate_kv_cache(layers, heads, dim, dtype=dtype, device="cpu", page_size=page, num_pages=pages)
    g = torch.Generator().manual_seed(0)
    for t in kv.k + kv.v:
        t.copy_(torch.randn(t.shape, generator=g).to(dtype))
    ps = allocate_pillar_store(layers, slots, heads, budget, "cpu")
    ps.indices.copy_(torch.randint(0, 1000, ps.indices.shape, generator=g, dtype=torch.int32))
    ps.lengths.copy_(torch.arange(1, slots + 1, dtype=torch.int32))
    return kv, ps


@pytest.mark.parametrize("chunk", [1, 2, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_to_other_pages_and_slot(chunk, dtype):
    kv, ps = _pools(dtype=dtype)
    pool = HostKVPool(kv, ps, num_pages=10, num_rows=3, chunk_pages=chunk)
    r = Request([1])
    src, host = (7, 2, 9, 3, 4), (5, 6, 7, 0, 9)  # scattered device pages; host runs 5-7, 0, 9
    want_k = [k[list(src)].clone() for k in kv.k]
    want_v = [v[list(src)].clone() for v in kv.v]
    want_rows, want_len = ps.indices[:, 1].clone(), ps.lengths[1].clone()
    pool.execute([], [SwapOp(r, src, host, pillar_slot=1, host_row=2)])
    for t in kv.k + kv.v:  # the device pages are someone else's now
        t.fill_(-1)
    ps.indices.fill_(-1), ps.lengths.fill_(0)
    dst = (0, 11, 10, 5, 6)
    pool.execute([SwapOp(r, dst, host, pillar_slot=3, host_row=2)], [])
    for layer in range(len(kv.k)):
        assert torch.equal(kv.k[layer][list(dst)], want_k[layer]) and torch.equal(kv.v[layer][list(dst)], want_v[layer])
        others = [p for p in range(kv.num_pages) if p not in dst]
        assert (kv.k[layer][others] == -1).all()  # nothing else written
    assert torch.equal(ps.indices[:, 3], want_rows) and ps.lengths[3] == want_len
    assert (ps.indices[:, [0, 1, 2]] == -1).all()
    assert (pool.stats.swaps_out, pool.stats.swaps_in, pool.stats.pages_out, pool.stats.pages_in) == (1, 1, 5, 5)


def test_restore_then_offload_in_one_plan_reuses_a_host_page_safely():
    """A plan may hand a host page freed by a restore to an offload: restores run first."""
    kv, ps = _pools()
    pool = HostKVPool(kv, None, num_pages=2, num_rows=2)
    a, b = Request([1]), Request([2])
    want_a = kv.k[0][3].clone()
    pool.execute([], [SwapOp(a, (3,), (1,), 0, 0)])
    kv.k[0][3].zero_()
    want_b = kv.k[0][8].clone()
    pool.execute([SwapOp(a, (3,), (1,), 0, 0)], [SwapOp(b, (8,), (1,), 1, 1)])
    assert torch.equal(kv.k[0][3], want_a)
    kv.k[0][8].zero_()
    pool.execute([SwapOp(b, (8,), (1,), 1, 1)], [])
    assert torch.equal(kv.k[0][8], want_b)


def test_runs_and_sizes():
    assert _runs([5, 6, 7, 0, 9, 10]) == [(0, 5, 3), (3, 0, 1), (4, 9, 2)]
    assert _runs([]) == []
    kv, _ = _pools(pages=7)
    assert 1 <= default_host_pages(kv) <= 7
    with pytest.raises(ValueError, match="num_pages"):
        HostKVPool(kv, None, num_pages=0, num_rows=1)


def test_config_knobs_validate():
    c = SparseSpecConfig(host_kv_pages=8, offload_chunk_pages=4, kv_oversubscription=2.0, offload=False)
    assert (c.host_kv_pages, c.offload_chunk_pages, c.kv_oversubscription, c.offload) == (8, 4, 2.0, False)
    for name, bad in (("host_kv_pages", 0), ("offload_chunk_pages", 0), ("kv_oversubscription", 0.0),
                      ("kv_oversubscription", -1.0)):
        with pytest.raises(ValueError, match=f"SparseSpecConfig.{name}"):
            SparseSpecConfig(**{name: bad})
    assert SparseSpecConfig.from_options({"host_kv_pages": 3}).host_kv_pages == 3
