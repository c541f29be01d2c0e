"""The attention work plan alone: every key of every row covered exactly once, chunks of about equal work."""

import torch
from hypothesis import given, settings, strategies as st

from sparsespec_compile.kernels.attention_plan import item_key_range, plan_attention, unit_capacity
from sparsespec_compile.kernels.attention_plan_triton import plan_attention_triton

# a row: (q_len, context before it, sparse?, pillars, dense tail); q_len 0 = a padding row
row = st.tuples(st.integers(0, 40), st.integers(0, 5000), st.booleans(), st.integers(0, 300), st.integers(0, 50))


def _virtual_range(q_len, L, qb, bq, sparse, n_pil, dstart, window):
    """(lo, n_virtual) of unit (row, qb): the kernel's definition, written out."""
    pos0 = L - q_len
    last = min(pos0 + (qb + 1) * bq, L) - 1
    if sparse:
        return 0, n_pil + max(last + 1 - dstart, 0)
    lo = max(pos0 + qb * bq - window + 1, 0) if window > 0 else 0
    return lo, last + 1


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.lists(row, min_size=1, max_size=12), bq=st.sampled_from([1, 2, 4, 16]),
       target=st.integers(1, 400), min_chunk=st.sampled_from([16, 256]), block_n=st.sampled_from([16, 64]),
       window=st.sampled_from([-1, 100]), pad=st.integers(0, 20), forced=st.sampled_from([None, 64]),
       max_chunks=st.sampled_from([4, 64]), compute_bound=st.booleans())
def test_plan_covers_every_key_exactly_once(rows, bq, target, min_chunk, block_n, window, pad, forced, max_chunks,
                                            compute_bound):
    q_lens = [q for q, *_ in rows]
    seq = [c + q if q else 0 for q, c, *_ in rows]
    sparse = [s and q > 0 for q, _, s, *_ in rows]
    dstart = [max(seq[r] - q_lens[r] - tail, 0) for r, (*_, tail) in enumerate(rows)]
    n_pil = [min(p, d) for (_, _, _, p, _), d in zip(rows, dstart)]
    T = sum(q_lens) + pad
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    slots = torch.tensor(list(reversed(range(len(rows)))))  # pillar rows in another order than the requests
    store_len = torch.zeros(len(rows), dtype=torch.int32)
    store_len[slots] = torch.tensor(n_pil, dtype=torch.int32)
    plan = plan_attention(qsl, torch.tensor(seq, dtype=torch.int32), T, bq, target_items=target, min_chunk=min_chunk,
                          max_chunks=max_chunks, sliding_window=window, is_sparse=torch.tensor(sparse),
                          draft_start=torch.tensor(dstart, dtype=torch.int32), pillar_lengths=store_len,
                          pillar_rows=slots, max_pillars=300, chunk_keys=forced, compute_bound=compute_bound)
    items, units = plan.items.tolist(), plan.units.tolist()
    assert len(units) == unit_capacity(T, len(rows), bq)
    real_units = [u for u in units if u[0] >= 0]
    want_units = [(r, qb) for r in range(len(rows)) if seq[r] > 0 for qb in range(-(-q_lens[r] // bq))]
    assert [(u[0], u[1]) for u in real_units] == want_units  # every (row, q-block) once, in order
    assert all(u[0] < 0 for u in units[len(real_units):])  # the real units come first
    real_items = [it for it in items if it[0] >= 0]
    assert all(it[0] < 0 for it in items[len(real_items):])
    chunk = int(plan.chunk)
    for r, qb, first, n_c in real_units:
        mine = real_items[first:first + n_c]
        assert [(it[0], it[1], it[2], it[3]) for it in mine] == [(r, qb, c, n_c) for c in range(n_c)]
        lo, n = _virtual_range(q_lens[r], seq[r], qb, bq, sparse[r], n_pil[r], dstart[r], window)
        covered = []
        for c in range(n_c):
            b, e = item_key_range(n, lo, c, n_c, block_n)
            covered += range(b, e)
            if n_c < max_chunks:  # an uncapped cut: no item holds more than a chunk (plus one tile of rounding)
                assert e - b <= chunk + block_n
        assert covered == list(range(lo, n))  # each key once, in order
    assert len(real_items) == sum(u[3] for u in real_units) <= plan.capacity
    fast = plan_attention_triton(qsl, torch.tensor(seq, dtype=torch.int32), T, bq, target_items=target,
                                 min_chunk=min_chunk, max_chunks=max_chunks, sliding_window=window,
                                 is_sparse=torch.tensor(sparse), draft_start=torch.tensor(dstart, dtype=torch.int32),
                                 pillar_lengths=store_len, pillar_rows=slots, max_pillars=300, chunk_keys=forced,
                                 compute_bound=compute_bound)
    assert torch.equal(fast.units, plan.units) and torch.equal(fast.items, plan.items)  # the one-launch planner
    assert int(fast.chunk) == chunk


def test_chunk_follows_the_total_work():
    """One verify row of 4,096 keys among 64 drafts of ~200: the long row is cut, the drafts are not."""
    q_lens = [9] + [1] * 64
    seq = [4096] + [3000] * 64
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    sparse = torch.tensor([False] + [True] * 64)
    plan = plan_attention(qsl, torch.tensor(seq, dtype=torch.int32), sum(q_lens), 16, target_items=80, min_chunk=128,
                          is_sparse=sparse, draft_start=torch.tensor([0] + [2990] * 64, dtype=torch.int32),
                          pillar_lengths=torch.full((65,), 190, dtype=torch.int32), max_pillars=256)
    n_c = {u[0]: u[3] for u in plan.units.tolist() if u[0] >= 0}
    total = 4096 + 64 * 200
    assert int(plan.chunk) == -(-total // 80)
    assert n_c[0] == -(-4096 // int(plan.chunk)) > 1
    assert all(n_c[r] == 1 for r in range(1, 65))


def test_enough_units_cut_only_outliers():
    """A prefill (32 q-blocks of 16 queries, 16..512 keys) fills a target of 8 items: no q-block is cut; a 20k-key row
    among them is (4x the mean). Decode steps (not compute-bound) always cut to the target."""
    q_lens, seq = [512, 9], [512, 20000]
    qsl = torch.tensor([0, 512, 521], dtype=torch.int32)
    plan = plan_attention(qsl, torch.tensor(seq, dtype=torch.int32), 521, 16, target_items=8, min_chunk=16,
                          compute_bound=True)
    n_c = [u[3] for u in plan.units.tolist() if u[0] == 0]
    assert len(n_c) == 32 and all(n == 1 for n in n_c)
    assert [u[3] for u in plan.units.tolist() if u[0] == 1][0] > 1
    fill = plan_attention(qsl, torch.tensor(seq, dtype=torch.int32), 521, 16, target_items=8, min_chunk=16)
    assert int(fill.chunk) == -(-(sum(min(512, 16 * (b + 1)) for b in range(32)) + 20000) // 8)
