"""Bucketing of decode steps into static shapes (what a CUDA graph is captured for), and the packed metadata."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.runtime.padded_step import pack_step
from sparsespec_compile.runtime.request import Request
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.step_plan import Refresh, StepEntry, StepKind, StepPlan
from sparsespec_compile.runtime.step_shapes import exact_shape, request_bucket, seq_bucket, shape_for, token_bucket


@given(st.integers(1, 20000))
def test_token_bucket_pads_at_most_an_eighth_above_64(n):
    b = token_bucket(n)
    assert b >= n and b % 8 == 0
    assert b - n < (8 if n <= 64 else n / 8 + 1)
    assert token_bucket(b) == b  # a bucket is its own bucket: one graph per bucket


@given(st.integers(1, 4096))
def test_request_and_seq_buckets_cover(n):
    assert request_bucket(n) >= n and request_bucket(request_bucket(n)) == request_bucket(n)
    assert request_bucket(n) <= max(n + n // 4 + 1, 2 * n if n <= 8 else 0)
    s = seq_bucket(n)
    assert s >= max(n, 1024) and s & (s - 1) == 0


def _req(blocks, pillar_slot, prompt_len=5):
    r = Request(list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8))
    r.block_table, r.pillar_slot = blocks, pillar_slot
    return r


def _plan():
    a, b = _req([3, 7, 1], 0), _req([2, 5], 4)
    return StepPlan(step=0, entries=[
        StepEntry(a, StepKind.DRAFT, (42,), start_pos=9, num_logits=1, sparse=True, draft_start=8),
        StepEntry(b, StepKind.VERIFY, (11, 12, 13), start_pos=5, num_logits=3, refresh=Refresh.SCORE, draft_start=5),
    ])


def test_shape_of_a_decode_step_and_no_shape_with_a_prefill():
    plan = _plan()
    shape = shape_for(plan, stride=4, page_size=4, max_tokens=64)
    assert (shape.tokens, shape.requests, shape.scored, shape.max_query_len, shape.max_seq_len) == (8, 2, 1, 5, 1024)
    assert shape.table_width == 256 and shape.sparse and exact_shape(plan).sparse
    full = StepPlan(0, [dataclasses.replace(e, sparse=False) for e in plan.entries])
    assert not shape_for(full, stride=4, page_size=4, max_tokens=64).sparse and not exact_shape(full).sparse
    assert shape_for(full, stride=4, page_size=4, max_tokens=64) != shape  # a graph of its own
    streaming = StepPlan(0, [dataclasses.replace(e, refresh=Refresh.STREAMING) for e in plan.entries])
    assert shape_for(streaming, stride=4, page_size=4, max_tokens=64).scored == 0  # streaming: written by the host
    assert shape_for(plan, stride=4, page_size=4, max_tokens=3) is None  # too many tokens
    plan.entries.append(StepEntry(_req([9], 1), StepKind.PREFILL, (1, 2, 3), 0, 1))
    assert shape_for(plan, stride=4, page_size=4, max_tokens=64) is None


def test_pack_step_layout_and_inert_padding():
    plan = _plan()
    shape = shape_for(plan, stride=4, page_size=4, max_tokens=64)
    shape = type(shape)(tokens=8, requests=4, scored=2, max_query_len=5, max_seq_len=1024, table_width=4)
    cfg = SparseSpecConfig(stride=4, min_budget=3, recent=1, page_size=4)
    buf = pack_step(plan, shape, cfg, page_size=4, scratch_slot=9)
    T, R, Rv, W = 8, 4, 2, 4
    ids, pos, slots, logits = (buf[i * T:(i + 1) * T] for i in range(4))
    assert ids.tolist() == [42, 11, 12, 13, 0, 0, 0, 0]
    assert pos.tolist() == [9, 5, 6, 7, 0, 0, 0, 0]
    # position 9 of table [3, 7, 1] -> page 2 (block 1) offset 1; positions 5..7 of [2, 5] -> block 5
    assert slots.tolist() == [1 * 4 + 1, 5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, -1, -1, -1, -1]
    assert logits[:4].tolist() == [0, 1, 2, 3]
    o = 4 * T
    assert buf[o:o + R + 1].tolist() == [0, 1, 4, 4, 4]  # padding requests own no tokens
    o += R + 1
    seq_lens, draft_start, pillar_slot, is_sparse = (buf[o + i * R:o + (i + 1) * R] for i in range(4))
    assert seq_lens.tolist() == [10, 8, 0, 0] and draft_start.tolist() == [8, 5, 0, 0]
    assert pillar_slot.tolist() == [0, 4, 9, 9] and is_sparse.tolist() == [1, 0, 0, 0]
    o += 4 * R
    assert buf[o:o + R * W].reshape(R, W).tolist() == [[3, 7, 1, 0], [2, 5, 0, 0], [0] * 4, [0] * 4]
    o += R * W
    rows, slots_, budget = (buf[o + i * Rv:o + (i + 1) * Rv] for i in range(3))
    assert rows.tolist() == [1, R - 1] and slots_.tolist() == [4, 9] and budget.tolist() == [3, 0]
    # reusing a buffer clears the previous step
    again = pack_step(plan, shape, cfg, page_size=4, scratch_slot=9, out=np.full_like(buf, 77))
    assert np.array_equal(again, buf)


def test_exact_shape_packs_the_eager_step_unpadded_with_two_tokens_at_least():
    plan = _plan()
    shape = exact_shape(plan)
    assert (shape.tokens, shape.requests, shape.scored, shape.max_query_len, shape.max_seq_len, shape.table_width,
            shape.num_logits) == (4, 2, 1, 3, 10, 3, 4)
    cfg = SparseSpecConfig(stride=4, min_budget=3, recent=1, page_size=4)
    buf = pack_step(plan, shape, cfg, page_size=4, scratch_slot=0)
    assert buf.shape == (shape.packed_size,) and buf[:4].tolist() == [42, 11, 12, 13]
    one = StepPlan(0, [plan.entries[0]])  # a lone draft: Dynamo would specialize a size-1 token axis
    shape = exact_shape(one)
    assert (shape.tokens, shape.num_logits) == (2, 2)
    buf = pack_step(one, shape, cfg, page_size=4, scratch_slot=0)
    assert buf[4:6].tolist() == [1 * 4 + 1, -1]  # the real token's slot; none for the padding token
    assert buf[6:8].tolist() == [0, 0]  # logits: the draft's own row (token 0), the padding row repeats token 0


def test_config_rejects_unknown_graph_mode():
    with pytest.raises(ValueError, match="cuda_graphs"):
        SparseSpecConfig(cuda_graphs="yes")


@given(st.lists(st.tuples(st.sampled_from(["grow", "replace", "clear"]), st.integers(0, 40)), max_size=30))
def test_block_table_mirror_tracks_growth_and_replacement(ops):
    """The incremental numpy copy always equals the request's current block table (grown in place, or replaced
    by a new list after a preemption / swap)."""
    from sparsespec_compile.runtime.padded_step import BlockTableMirror

    mirror, r, nxt = BlockTableMirror(), _req([], 0), 0
    for op, n in ops:
        if op == "grow":
            r.block_table.extend(range(nxt, nxt + n))
        elif op == "replace":
            r.block_table = list(range(nxt, nxt + n))
        else:
            r.block_table = []
        nxt += n
        assert mirror.get(r).tolist() == r.block_table
    mirror.forget_all_but(set())
    assert mirror.get(r).tolist() == r.block_table


@pytest.mark.parametrize("sparse, scored, keeps_store", [(True, 1, True), (True, 0, True), (False, 1, True),
                                                        (False, 0, False)])
def test_a_step_without_sparse_or_scored_rows_runs_without_the_pillar_store(sparse, scored, keeps_store,
                                                                           monkeypatch):
    """A speculative config decoding plainly (every row full, nothing scored) runs the stride-0 step's kernels: the
    forward context has no pillar store, so the attention takes its full-row variant."""
    import types

    import torch

    from sparsespec_compile.runtime import step_forward

    seen = {}
    monkeypatch.setattr(step_forward, "run_compiled", lambda compiled, ctx, *a: seen.setdefault("ctx", ctx))
    plan = _plan()
    entries = [dataclasses.replace(plan.entries[0], sparse=sparse),
               dataclasses.replace(plan.entries[1], refresh=Refresh.SCORE if scored else Refresh.NONE)]
    plan = StepPlan(0, entries).seal()
    shape = exact_shape(plan)
    cfg = SparseSpecConfig(stride=4, min_budget=3, recent=1, page_size=4)
    packed = torch.from_numpy(pack_step(plan, shape, cfg, page_size=4, scratch_slot=0))
    kv = types.SimpleNamespace(k=[torch.zeros(4, 4, 1, 8)])
    store = types.SimpleNamespace(indices=torch.zeros(1, 2, 1, 4, dtype=torch.int32))
    step_forward.run_packed(None, packed, shape, kv=kv, pillars=store, recent=1, sliding_windows=[-1],
                            impl="reference", num_layers=1)
    assert (seen["ctx"].pillars is store) is keeps_store
    assert (seen["ctx"].layer_scores is not None) is bool(scored)
