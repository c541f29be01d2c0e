"""unified_attention: Triton (interpreter) vs the reference vs a naive dense softmax, on mixed ragged batches."""

import pytest
import torch
import triton
from hypothesis import given, settings, strategies as st
from kernel_cases import TOL, make_batch, make_sparse, rel_err, request_masks

from sparsespec_compile import kernels
from sparsespec_compile.kernels.attention_triton import unified_attention_triton
from sparsespec_compile.kernels.reference import naive_dense_attention

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def _attend(b, impl, **kw):
    return kernels.unified_attention(b.q, b.k_cache, b.v_cache, **b.meta(), max_query_len=b.max_query_len,
                                     max_seq_len=b.max_seq_len, scale=b.scale, return_lse=True, impl=impl, **kw)


def _check_close(out, lse, ref_out, ref_lse, dtype):
    tol = TOL[dtype]
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) < tol["rtol"] * 10
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), rtol=1e-4, atol=1e-4)


# A request is (kind, q_len, seq_len): prefill chunks, single draft tokens, k+1 verify chunks, odd lengths.
request = st.one_of(
    st.tuples(st.just("prefill"), st.integers(1, 40)).map(lambda t: (t[1], t[1])),
    st.tuples(st.integers(1, 24), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1])),  # chunk after context
    st.integers(1, 70).map(lambda L: (1, L)),  # draft / decode, single-token contexts included
    st.integers(9, 60).map(lambda L: (9, L)),  # verify k + 1 = 9
)


@SETTINGS
@given(specs=st.lists(request, min_size=1, max_size=5), hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4, 8]),
       d=st.sampled_from([16, 32, 64]), page=st.sampled_from([1, 4, 16]), dtype=st.sampled_from([torch.float32, torch.float16]),
       softcap=st.sampled_from([0.0, 5.0]), window=st.sampled_from([-1, 7]), chunk=st.sampled_from([None, 16, 40]),
       small_block=st.sampled_from([0, 1, 2]),  # the plan's block / a padded-group block (4 of 5 queries) / dense
       sparse=st.booleans(), pad=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_triton_matches_reference(specs, hkv, group, d, page, dtype, softcap, window, chunk, small_block, sparse, pad,
                                  seed):
    b = make_batch(specs, hkv * group, hkv, d, page, dtype, seed=seed, pad_tokens=pad)
    kw = dict(softcap=softcap, sliding_window=window)
    if sparse:
        kw.update(make_sparse(b, [r for r in range(len(specs)) if r % 2 == 0], hkv, bmax=24, seed=seed))
    ref_out, ref_lse = _attend(b, "reference", **kw)
    out, lse = unified_attention_triton(b.q, b.k_cache, b.v_cache, **b.meta(), max_query_len=b.max_query_len,
                                        max_seq_len=b.max_seq_len, scale=b.scale, chunk_keys=chunk, max_chunks=4,
                                        block_q=[None, max(1, 16 // triton.next_power_of_2(group)),
                                                 max(1, 16 // group)][small_block],
                                        **kw)
    _check_close(out, lse, ref_out, ref_lse, dtype)
    T = int(b.query_start_loc[-1])
    assert (out[T:] == 0).all() and torch.isinf(lse[T:]).all()  # padding tokens: zeros, -inf


@settings(max_examples=8, deadline=None, derandomize=True)
@given(specs=st.lists(request, min_size=1, max_size=4), group=st.sampled_from([1, 3, 4]),
       softcap=st.sampled_from([0.0, 5.0]), window=st.sampled_from([-1, 5]), sparse=st.booleans(),
       seed=st.integers(0, 2**16))
def test_reference_matches_naive_dense(specs, group, softcap, window, sparse, seed):
    hkv = 2
    b = make_batch(specs, hkv * group, hkv, 8, 4, torch.float32, seed=seed)
    kw = dict(softcap=softcap, sliding_window=window)
    sp = make_sparse(b, range(0, len(specs), 2), hkv, bmax=16, seed=seed) if sparse else None
    out, _ = _attend(b, "reference", **kw, **(sp or {}))
    qsl = b.query_start_loc.tolist()
    for r in range(len(specs)):
        mask = request_masks(b, r, hkv * group, hkv, window, sp)
        ref = naive_dense_attention(b.q[qsl[r]:qsl[r + 1]], b.context(r, b.k_cache), b.context(r, b.v_cache),
                                    b.scale, mask, softcap)
        torch.testing.assert_close(out[qsl[r]:qsl[r + 1]].double(), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(specs=st.lists(st.integers(2, 50).flatmap(lambda L: st.tuples(st.integers(1, min(L, 9)), st.just(L))),
                      min_size=1, max_size=4),
       impl=st.sampled_from(["reference", "triton"]), seed=st.integers(0, 2**16))
def test_sparse_covering_prefix_equals_full(specs, impl, seed):
    """PillarAttn with every position before draft_start as a pillar is full attention."""
    b = make_batch(specs, 8, 2, 16, 4, torch.float32, seed=seed)
    sp = make_sparse(b, range(len(specs)), 2, bmax=64, cover_all=True)
    full, full_lse = _attend(b, impl)
    out, lse = _attend(b, impl, **sp)
    _check_close(out, lse, full, full_lse, torch.float32)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(L=st.integers(9, 80), k=st.sampled_from([3, 8]), group=st.sampled_from([1, 4]), page=st.sampled_from([4, 16]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16))
def test_verify_equals_sequential_decodes(L, k, group, page, dtype, seed):
    """k+1 verify queries in one chunk == k+1 single-token decodes over the growing context."""
    n = min(k + 1, L)
    b = make_batch([(n, L)], 2 * group, 2, 64, page, dtype, seed=seed)
    out, lse = _attend(b, "triton")
    for i in range(n):
        b1 = make_batch([(n, L)], 2 * group, 2, 64, page, dtype, seed=seed)  # same data
        b1.q = b.q[i:i + 1]
        b1.query_start_loc = torch.tensor([0, 1], dtype=torch.int32)
        b1.seq_lens = torch.tensor([L - n + i + 1], dtype=torch.int32)
        b1.max_query_len, b1.max_seq_len = 1, L - n + i + 1
        o1, l1 = _attend(b1, "triton")
        torch.testing.assert_close(out[i:i + 1].float(), o1.float(), **TOL[dtype])
        torch.testing.assert_close(lse[i:i + 1], l1, rtol=1e-4, atol=1e-4)


def test_head_dim_128_gqa_8_mixed_batch():
    specs = [(17, 17), (1, 33), (9, 47), (1, 1)]
    b = make_batch(specs, 16, 2, 128, 16, torch.float16, seed=3, pad_tokens=1)
    sp = make_sparse(b, [1, 2], 2, bmax=32, seed=3)
    _check_close(*_attend(b, "triton", **sp), *_attend(b, "reference", **sp), torch.float16)


def test_rejects_bad_arguments():
    b = make_batch([(1, 5)], 4, 2, 16, 4, torch.float32)
    import pytest

    with pytest.raises(ValueError, match="multiple of the KV heads"):
        kernels.unified_attention(b.q[:, :3], b.k_cache, b.v_cache, **b.meta(), max_query_len=1, max_seq_len=5,
                                  scale=1.0, impl="reference")
    with pytest.raises(ValueError, match="impl must be"):
        _attend(b, "cuda")
    with pytest.raises(ValueError, match="draft_start"):
        _attend(b, "reference", is_sparse=torch.ones(1, dtype=torch.bool))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_pillar_rows_address_a_store(impl):
    """pillar_rows reads each request's pillars from its slot of a larger store: same result as a gathered copy."""
    specs = [(1, 40), (9, 50), (1, 23), (3, 30)]
    b = make_batch(specs, 8, 2, 16, 4, torch.float16, seed=11)
    sp = make_sparse(b, [0, 2, 3], 2, bmax=16, seed=11)
    slots = torch.tensor([5, 0, 2, 3])
    store = torch.randint(0, 7, (7, 2, 16), dtype=torch.int32)  # junk in unused slots
    lengths = torch.randint(0, 16, (7,), dtype=torch.int32)
    store[slots], lengths[slots] = sp["pillar_indices"], sp["pillar_lengths"]
    want = _attend(b, impl, **sp)
    got = _attend(b, impl, **{**sp, "pillar_indices": store, "pillar_lengths": lengths, "pillar_rows": slots})
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("pad", [1, 3])
def test_split_path_writes_padding_rows_itself(monkeypatch, pad):
    """With split KV the merge kernel writes every row, so out / lse are allocated without a fill (two fewer
    launches per layer): padding tokens must still come out as zeros / -inf, whatever the memory held."""
    real_empty = torch.empty

    def poisoned(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    b = make_batch([(1, 40), (3, 70)], 8, 2, 32, 4, torch.float32, seed=pad, pad_tokens=pad)
    ref_out, ref_lse = _attend(b, "reference")
    monkeypatch.setattr(torch, "empty", poisoned)
    out, lse = unified_attention_triton(b.q, b.k_cache, b.v_cache, **b.meta(), max_query_len=b.max_query_len,
                                        max_seq_len=b.max_seq_len, scale=b.scale, chunk_keys=16, max_chunks=8)
    monkeypatch.undo()
    T = int(b.query_start_loc[-1])
    assert (out[T:] == 0).all() and torch.isneginf(lse[T:]).all()
    _check_close(out, lse, ref_out, ref_lse, torch.float32)


# Long rows across many pages (the plan cuts them into several items and merges them), head dims 64 / 128: the
# shapes of real steps, few examples (the interpreter runs every program in Python).
long_request = st.one_of(
    st.integers(1, 5000).map(lambda L: (1, L)),  # draft / decode
    st.integers(9, 5000).map(lambda L: (9, L)),  # verify k + 1 = 9
    st.integers(1, 48).flatmap(lambda n: st.integers(n, 600).map(lambda L: (n, L))),  # prefill chunk after context
)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(specs=st.lists(long_request, min_size=1, max_size=4), group=st.sampled_from([1, 3, 4, 8]),
       d=st.sampled_from([64, 128]), window=st.sampled_from([-1, 300]), softcap=st.sampled_from([0.0, 5.0]),
       sparse=st.booleans(), seed=st.integers(0, 2**16))
def test_long_rows_at_the_plans_own_cut(specs, group, d, window, softcap, sparse, seed):
    hkv = 2
    b = make_batch(specs, hkv * group, hkv, d, 16, torch.float32, seed=seed, pad_tokens=2)
    kw = dict(softcap=softcap, sliding_window=window)
    if sparse:
        kw.update(make_sparse(b, range(0, len(specs), 2), hkv, bmax=256, seed=seed))
    _check_close(*_attend(b, "triton", **kw), *_attend(b, "reference", **kw), torch.float32)


def test_one_plan_serves_every_layer_with_merges_in_the_kernel():
    """The last item of each cut unit merges it and resets the unit's count: a plan reused by several layers (as a
    step's plan is) gives the reference each time, its counts are all zero after every launch, and a plan built for
    other KV heads is refused."""
    specs = [(9, 9 + 70), (1, 55), (37, 37), (9, 9 + 33)]
    b = make_batch(specs, 6, 2, 16, 4, torch.float32, seed=11, pad_tokens=2)
    plan = kernels.attention_plan(b.q, b.k_cache, query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
                                  max_query_len=b.max_query_len, chunk_keys=16, max_chunks=4)
    assert plan.counters.shape == (plan.capacity, 2) and not plan.counters.any()
    assert int((plan.items[:, 3] > 1).sum()) > 0  # some units are cut, so the kernel merges
    for layer in range(3):
        q = b.q * (1 + layer)  # another layer's queries, same rows
        ref_out, ref_lse = kernels.unified_attention(q, b.k_cache, b.v_cache, **b.meta(), max_query_len=b.max_query_len,
                                                     max_seq_len=b.max_seq_len, scale=b.scale, return_lse=True,
                                                     impl="reference")
        out, lse = kernels.unified_attention(q, b.k_cache, b.v_cache, **b.meta(), max_query_len=b.max_query_len,
                                             max_seq_len=b.max_seq_len, scale=b.scale, return_lse=True, plan=plan)
        _check_close(out, lse, ref_out, ref_lse, torch.float32)
        assert not plan.counters.any()
    other = kernels.attention_plan(b.q, b.k_cache[:, :, :1], query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
                                   max_query_len=b.max_query_len)
    with pytest.raises(ValueError, match="merge counters"):
        kernels.unified_attention(b.q, b.k_cache, b.v_cache, **b.meta(), max_query_len=b.max_query_len,
                                  max_seq_len=b.max_seq_len, scale=b.scale, plan=other)
