"""Streaming (MagicDec-like) draft sets, written for every verifying request of a step at once: each row holds
the ``sinks`` first positions and the newest ``budget - sinks`` of its context, in order, and its length."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsespec_compile.runtime.kv_cache import allocate_pillar_store
from sparsespec_compile.runtime.streaming_pillars import write_streaming_pillars


def expected_row(context_len: int, budget: int, sinks: int) -> list[int]:
    b = min(budget, context_len)
    s = min(sinks, b)
    return list(range(s)) + list(range(context_len - (b - s), context_len))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 24)), min_size=1, max_size=5, unique_by=lambda x: x),
       st.integers(0, 6))
def test_batched_rows_equal_the_definition(requests, sinks):
    layers, slots, heads, max_budget = 2, 6, 3, 24
    store = allocate_pillar_store(layers, slots, heads, max_budget, torch.device("cpu"))
    store.indices.fill_(-7)  # stale rows: only [:length] may be read, the rest must not matter
    store.lengths.fill_(-7)
    slot_ids = list(range(len(requests)))[::-1]
    write_streaming_pillars(store, slot_ids, [c for c, _ in requests], [b for _, b in requests], sinks=sinks)
    for slot, (ctx, budget) in zip(slot_ids, requests):
        want = expected_row(ctx, budget, sinks)
        assert int(store.lengths[slot]) == len(want)
        for layer in range(layers):
            for h in range(heads):
                assert store.indices[layer, slot, h, : len(want)].tolist() == want
    untouched = set(range(slots)) - set(slot_ids)
    assert all(int(store.lengths[s]) == -7 for s in untouched)


def test_no_requests_writes_nothing():
    store = allocate_pillar_store(1, 2, 1, 4, torch.device("cpu"))
    before = store.indices.clone()
    write_streaming_pillars(store, [], [], [])
    assert torch.equal(store.indices, before)
