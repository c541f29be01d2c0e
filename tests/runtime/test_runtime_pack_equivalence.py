"""The vectorised ``pack_step`` / shapes / placeholder patch are byte-identical to the straightforward per-entry loops
they replaced (kept here as the reference), on random plans: prefill chunks, drafts, verify chunks, scored and
streaming rows, placeholders, padding, reused buffers, block tables that grow or are replaced between steps."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsespec_compile.config import SparseSpecConfig
from sparsespec_compile.runtime.overlap import placeholder_patch, source_row
from sparsespec_compile.runtime.padded_step import BlockTableMirror, pack_step, packed_fields
from sparsespec_compile.runtime.request import Request
from sparsespec_compile.runtime.sampling_params import SamplingParams
from sparsespec_compile.runtime.step_plan import Refresh, StepEntry, StepKind, StepPlan
from sparsespec_compile.runtime.step_shapes import StepShape, exact_shape, request_bucket, seq_bucket, shape_for, \
    token_bucket

PAGE = 4


def reference_pack(plan, shape, config, page_size, scratch_slot, out=None):
    buf = np.zeros(shape.packed_size, dtype=np.int64) if out is None else out
    f = packed_fields(buf, shape)
    ids, pos, slots, logits, qsl = f["input_ids"], f["positions"], f["slot_mapping"], f["logits_indices"], \
        f["query_start_loc"]
    seq_lens, draft_start, pillar_slot, is_sparse = f["seq_lens"], f["draft_start"], f["pillar_slot"], f["is_sparse"]
    table_rows, score_rows, score_slots, budget = f["block_tables"], f["score_rows"], f["score_slots"], f["budget"]
    R, Rv, W = shape.requests, shape.scored, shape.table_width
    if out is not None:
        buf[:] = 0
    slots[:] = -1
    pillar_slot[:] = scratch_slot
    score_slots[:] = scratch_slot
    t = n_scored = n_logits = 0
    for i, e in enumerate(plan.entries):
        r = e.request
        n = e.num_tokens
        bt = np.asarray(r.block_table, dtype=np.int64)
        ids[t:t + n] = e.token_ids
        p = np.arange(e.start_pos, e.start_pos + n)
        pos[t:t + n] = p
        slots[t:t + n] = bt[p // page_size] * page_size + p % page_size
        k = e.num_logits
        if k:
            logits[n_logits:n_logits + k] = np.arange(t + n - k, t + n)
        n_logits += k
        t += n
        qsl[i + 1] = t
        seq_lens[i] = e.seq_len
        draft_start[i] = e.draft_start
        pillar_slot[i] = r.pillar_slot
        is_sparse[i] = e.sparse
        w = min(len(bt), W)
        table_rows[i, :w] = bt[:w]
        if Rv and e.refresh is Refresh.SCORE:
            score_rows[n_scored] = i
            score_slots[n_scored] = r.pillar_slot
            budget[n_scored] = config.budget(e.start_pos)
            n_scored += 1
    qsl[len(plan.entries) + 1:] = t
    score_rows[n_scored:] = R - 1
    return buf


def reference_shape_for(plan, stride, page_size, max_tokens):
    if not plan.entries or any(e.kind is StepKind.PREFILL for e in plan.entries):
        return None
    t = plan.num_tokens
    if t > max_tokens:
        return None
    mq = 1 if all(e.num_tokens == 1 for e in plan.entries) else stride + 1
    if max(e.num_tokens for e in plan.entries) > mq:
        return None
    scored = sum(1 for e in plan.entries if e.refresh is Refresh.SCORE)
    seq = seq_bucket(max(e.seq_len for e in plan.entries))
    return StepShape(tokens=token_bucket(t), requests=request_bucket(len(plan.entries)), scored=request_bucket(scored),
                     max_query_len=mq, max_seq_len=seq, table_width=-(-seq // page_size),
                     sparse=any(e.sparse for e in plan.entries))


def reference_exact_shape(plan):
    return StepShape(
        tokens=max(plan.num_tokens, 2), requests=len(plan.entries),
        scored=sum(1 for e in plan.entries if e.refresh is Refresh.SCORE),
        max_query_len=max(e.num_tokens for e in plan.entries), max_seq_len=max(e.seq_len for e in plan.entries),
        table_width=max(len(e.request.block_table) for e in plan.entries),
        logits=max(sum(e.num_logits for e in plan.entries), 2), sparse=any(e.sparse for e in plan.entries),
    )


def reference_patch(plan):
    dst, src = [], []
    for off, e in zip(plan.token_offsets(), plan.entries):
        for j, tok in enumerate(e.token_ids):
            if tok < -1:
                dst.append(off + j)
                src.append(source_row(tok))
    return dst, src


@st.composite
def entry_specs(draw, stride):
    kind = draw(st.sampled_from([StepKind.PREFILL, StepKind.DRAFT, StepKind.VERIFY]))
    start = draw(st.integers(0, 300))
    if kind is StepKind.PREFILL:
        n = draw(st.integers(1, 40))
        k = draw(st.integers(0, 1))
    elif kind is StepKind.DRAFT:
        n, k = 1, 1
    else:
        n = draw(st.integers(1, stride + 1))
        k = n
    toks = tuple(draw(st.lists(st.integers(-6, 500), min_size=n, max_size=n)))
    refresh = draw(st.sampled_from(list(Refresh))) if kind is StepKind.VERIFY else Refresh.NONE
    sparse = kind is StepKind.DRAFT and draw(st.booleans())
    spare = draw(st.integers(0, 3))  # pages past the step's last token
    return kind, start, toks, k, refresh, sparse, draw(st.integers(0, start + n)), spare


def _plan(specs, state, draw_slot):
    """Entries over requests that persist in ``state`` (request index -> Request), so the mirror sees growth."""
    entries = []
    for j, (kind, start, toks, k, refresh, sparse, ds, spare) in enumerate(specs):
        r = state.get(j)
        pages = -(-(start + len(toks)) // PAGE) + spare
        if r is None or draw_slot(j) == 0:  # a new request, or one whose table was replaced (a swap / preemption)
            if r is None:
                r = state[j] = Request([1, 2, 3], SamplingParams(max_tokens=8))
            r.block_table = list(np.random.default_rng(j + pages).permutation(4 * pages)[:pages])
        elif len(r.block_table) < pages:
            r.block_table.extend(range(1000 + len(r.block_table), 1000 + pages))  # grown in place
        r.pillar_slot = j % 7
        entries.append(StepEntry(r, kind, toks, start_pos=start, num_logits=k, sparse=sparse, refresh=refresh,
                                 draft_start=ds))
    return StepPlan(step=0, entries=entries).seal()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pack_and_shapes_match_the_reference_loops(data):
    stride = data.draw(st.integers(1, 8))
    cfg = SparseSpecConfig(stride=stride, min_budget=3, recent=1, page_size=PAGE)
    mirror, state, out = BlockTableMirror(), {}, {}
    for step in range(data.draw(st.integers(1, 4))):
        specs = data.draw(st.lists(entry_specs(stride), min_size=1, max_size=12))
        plan = _plan(specs, state, lambda j: data.draw(st.integers(0, 4)))
        assert exact_shape(plan) == reference_exact_shape(plan)
        got_shape = shape_for(plan, stride, PAGE, 64)
        assert got_shape == reference_shape_for(plan, stride, PAGE, 64)
        shapes = [exact_shape(plan)] + ([got_shape] if got_shape is not None else [])
        for shape in shapes:
            scratch = data.draw(st.integers(0, 9))
            want = reference_pack(plan, shape, cfg, PAGE, scratch)
            assert np.array_equal(pack_step(plan, shape, cfg, PAGE, scratch), want)
            buf = out.setdefault(shape.packed_size, np.full(shape.packed_size, 77, dtype=np.int64))
            got = pack_step(plan, shape, cfg, PAGE, scratch, out=buf, tables=mirror)
            assert got is buf and np.array_equal(got, want)
        dst, src = placeholder_patch(plan)
        assert (dst.tolist(), src.tolist()) == reference_patch(plan)
        if data.draw(st.booleans()):
            mirror.forget_all_but({id_ for id_ in (r.request_id for r in state.values()) if id_ % 2})


def test_pack_of_an_empty_plan_is_all_padding():
    shape = StepShape(tokens=8, requests=4, scored=2, max_query_len=1, max_seq_len=1024, table_width=4)
    cfg = SparseSpecConfig(stride=4, min_budget=3, recent=1, page_size=PAGE)
    assert np.array_equal(pack_step(StepPlan(0, []), shape, cfg, PAGE, 5),
                          reference_pack(StepPlan(0, []), shape, cfg, PAGE, 5))
