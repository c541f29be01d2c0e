from types import SimpleNamespace

import pytest
import torch

from sparsespec_compile.context import PagedKVCache, PillarStore
from sparsespec_compile.runtime import kv_cache
from sparsespec_compile.runtime.block_allocator import BlockAllocator
from sparsespec_compile.runtime.kv_cache import (allocate_kv_cache, allocate_pillar_store, kv_shape_from_config,
                                                 page_bytes, slot_mapping)


def test_explicit_pages_layout():
    kv = allocate_kv_cache(3, 2, 8, dtype=torch.bfloat16, device="cpu", page_size=4, num_pages=5)
    assert isinstance(kv, PagedKVCache) and kv.num_pages == 5 and kv.page_size == 4
    assert len(kv.k) == len(kv.v) == 3
    for t in kv.k + kv.v:
        assert t.shape == (5, 4, 2, 8) and t.dtype == torch.bfloat16 and t.is_contiguous() and not t.any()
    kv.k[1].fill_(1)  # layers and K/V are distinct storage regions
    assert not kv.k[0].any() and not kv.k[2].any() and not kv.v[1].any()


def test_sized_from_memory_fraction(monkeypatch):
    per_page = page_bytes(3, 2, 8, 4, torch.float32)
    assert per_page == 2 * 3 * 4 * 2 * 8 * 4
    monkeypatch.setattr(kv_cache, "free_memory_bytes", lambda device: 100 * per_page)
    kv = allocate_kv_cache(3, 2, 8, dtype=torch.float32, device="cpu", page_size=4, memory_fraction=0.5)
    assert kv.num_pages == 50
    with pytest.raises(ValueError, match="memory_fraction"):
        allocate_kv_cache(3, 2, 8, dtype=torch.float32, device="cpu", memory_fraction=1.5)
    monkeypatch.setattr(kv_cache, "free_memory_bytes", lambda device: per_page // 2)
    with pytest.raises(ValueError, match="no page fits"):
        allocate_kv_cache(3, 2, 8, dtype=torch.float32, device="cpu", page_size=4)


def test_real_free_memory_is_measured_on_cpu():
    assert kv_cache.free_memory_bytes("cpu") > 0


def test_pillar_store_and_slots():
    ps = allocate_pillar_store(3, 6, 2, 16, "cpu")
    assert isinstance(ps, PillarStore) and ps.indices.shape == (3, 6, 2, 16) and ps.max_budget == 16
    assert ps.indices.dtype == ps.lengths.dtype == torch.int32 and ps.lengths.shape == (6,)
    with pytest.raises(ValueError):
        allocate_pillar_store(3, 0, 2, 16, "cpu")


def test_slot_mapping_follows_block_table():
    a = BlockAllocator(8, page_size=4)
    a.allocate(3)  # someone else's pages: the table below is not 0, 1, 2
    table: list[int] = []
    assert a.grow(table, 10)
    assert slot_mapping(table, range(3, 9), 4) == [table[0] * 4 + 3] + [table[1] * 4 + i for i in range(4)] + [table[2] * 4]


def test_kv_shape_from_hf_config():
    assert kv_shape_from_config(SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                                hidden_size=576)) == (30, 3, 64)
    assert kv_shape_from_config(SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                                head_dim=32, num_key_value_heads=None)) == (2, 4, 32)
