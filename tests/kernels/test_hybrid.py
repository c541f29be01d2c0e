"""The hybrid draft's split and the draft-recall telemetry (kernels/hybrid.py): Triton (interpreter) vs reference,
the split's extremes equal the pillar and the streaming drafts, recall 1.0 when the draft set covers the context;
and the kernels at Gemma3's shape (head dim 256, one KV head, a 4-head group)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from kernel_cases import TOL, make_batch, make_sparse

from sparsespec_compile import kernels
from sparsespec_compile.kernels.attention_triton import unified_attention_triton
from sparsespec_compile.kernels.hybrid import draft_mass, draft_recall, hybrid_split
from sparsespec_compile.runtime.kv_cache import allocate_pillar_store
from sparsespec_compile.runtime.streaming_pillars import write_streaming_pillars

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)


def _scores(ctx, budget, H=2, N=None, seed=0):
    """Random mean-probability-like scores [Rv, H, N] (-inf past each row's context), ties included."""
    g = torch.Generator().manual_seed(seed)
    N = N or max(max(ctx), 1)
    s = torch.rand(len(ctx), H, N, generator=g).pow(3) / N
    n = (N - 1) // 5
    s[..., 0:5 * n:5] = s[..., 1:5 * n + 1:5]  # exact ties
    pos = torch.arange(N)
    s = torch.where(pos[None, None, :] < torch.tensor(ctx)[:, None, None], s, float("-inf"))
    return s, torch.tensor(ctx, dtype=torch.int32), torch.tensor(budget, dtype=torch.int32)


rows = st.lists(st.tuples(st.integers(0, 90), st.integers(0, 40)), min_size=1, max_size=4)


@SETTINGS
@given(rows=rows, share=st.sampled_from(["request", "layer", 0.0, 0.3, 1.0]), recent=st.integers(0, 6),
       seed=st.integers(0, 2**16))
def test_hybrid_select_triton_matches_reference(rows, share, recent, seed):
    L, H = 2, 2
    ctx, budget = [c for c, _ in rows], [b for _, b in rows]
    s, c, b = _scores(ctx * L, budget * L, H, seed=seed)  # L layers' rows back to back
    for impl in ("reference", "triton"):
        mass = draft_mass(s, c, b, impl=impl)
        if impl == "triton":
            torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-7)
        ref_mass = mass
    window, sinks = hybrid_split(mass.view(L, len(rows), H, 3), c[: len(rows)], b[: len(rows)], recent, share)
    kw = dict(recent=window.view(-1, H), sinks=sinks.view(-1, H), max_budget=48)
    ref = kernels.select_pillars(s, c, b, **kw, impl="reference")
    out = kernels.select_pillars(s, c, b, **kw, impl="triton")
    assert torch.equal(out[1], ref[1])
    for j in range(s.shape[0]):
        n = int(ref[1][j])
        assert torch.equal(out[0][j, :, :n], ref[0][j, :, :n]), j
        for h in range(H):  # the forced sinks and window are in; every entry distinct and in the context
            got = set(ref[0][j, h, :n].tolist())
            assert len(got) == n and all(0 <= p < int(c[j]) for p in got)
            w, k = int(window.view(-1, H)[j, h]), int(sinks.view(-1, H)[j, h])
            assert set(range(min(k, n))) <= got
            assert set(range(int(c[j]) - min(w, n - min(k, n)), int(c[j]))) <= got


@SETTINGS
@given(rows=rows, recent=st.integers(0, 6), seed=st.integers(0, 2**16), impl=st.sampled_from(["reference", "triton"]))
def test_split_extremes_are_the_pillar_and_streaming_drafts(rows, recent, seed, impl):
    ctx, budget = [c for c, _ in rows], [max(b, 1) for _, b in rows]
    s, c, b = _scores(ctx, budget, seed=seed)
    mass = draft_mass(s, c, b, impl=impl)[None]
    pillar = kernels.select_pillars(s, c, b, recent=recent, max_budget=48, impl=impl)
    w, k = hybrid_split(mass, c, b, recent, 0.0)
    zero = kernels.select_pillars(s, c, b, recent=w[0], sinks=k[0], max_budget=48, impl=impl)
    assert torch.equal(zero[0], pillar[0]) and torch.equal(zero[1], pillar[1])
    w, k = hybrid_split(mass, c, b, recent, 1.0)
    one = kernels.select_pillars(s, c, b, recent=w[0], sinks=k[0], max_budget=48, impl=impl)
    store = allocate_pillar_store(1, len(rows), 2, 48, torch.device("cpu"))
    live = [j for j, n in enumerate(ctx) if n > 0]  # the streaming writer is only called for verified contexts
    write_streaming_pillars(store, live, [ctx[j] for j in live], [budget[j] for j in live])
    for j in live:
        n = int(one[1][j])
        assert n == int(store.lengths[j])
        assert torch.equal(one[0][j, :, :n], store.indices[0, j, :, :n])


def test_adaptive_share_follows_the_attention_mass():
    """Mass on the newest tokens -> the window draft; mass on far tokens -> pillars (the `recent` newest only)."""
    N, budget, recent = 64, 12, 2
    c, b = torch.tensor([N, N], dtype=torch.int32), torch.tensor([budget, budget], dtype=torch.int32)
    s = torch.zeros(2, 1, N)
    s[0, 0, N - 8:] = 0.1  # row 0: the verify queries looked at the newest tokens
    s[1, 0, 10:18] = 0.1  # row 1: at tokens far back
    w, k = hybrid_split(draft_mass(s, c, b, impl="reference")[None], c, b, recent, "request")
    assert k[0, :, 0].tolist() == [4, 4]
    assert int(w[0, 0, 0]) == budget - 4  # all window: the streaming draft
    assert int(w[0, 1, 0]) == recent  # no mass in the window region: pillars take the rest


def test_recall_is_one_when_the_set_covers_the_context():
    ctx = [30, 7, 50]
    s, c, b = _scores(ctx, [64, 64, 64], seed=3)
    mass = draft_mass(s, c, b, impl="reference")
    idx, lengths = kernels.select_pillars(s, c, b, recent=4, max_budget=64, impl="reference")
    torch.testing.assert_close(draft_recall(s, idx, lengths, mass[..., 2]), torch.ones(3, 2))
    small = kernels.select_pillars(s, c, torch.tensor([3, 3, 3]), recent=1, max_budget=64, impl="reference")
    r = draft_recall(s, *small, mass[..., 2])
    assert (r < 1.0).all() and (r >= 1.0 - mass[..., 2] - 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_at_gemma3_shape(dtype):
    """Head dim 256 (BLOCK_D 256), one KV head, group 4, a sliding window: attention (full, verify and sparse rows)
    and the pillar scores, Triton in the interpreter vs the reference."""
    specs = [(9, 40), (1, 33), (1, 21), (5, 5)]
    b = make_batch(specs, 4, 1, 256, 16, dtype, seed=1)
    kw = dict(**b.meta(), max_query_len=b.max_query_len, max_seq_len=b.max_seq_len, scale=256 ** -0.5,
              sliding_window=24, return_lse=True)
    kw.update(make_sparse(b, [1, 2], 1, bmax=8, seed=1))
    ref_out, ref_lse = kernels.unified_attention(b.q, b.k_cache, b.v_cache, impl="reference", **kw)
    kw.pop("return_lse")
    out, lse = unified_attention_triton(b.q, b.k_cache, b.v_cache, **kw)
    torch.testing.assert_close(out.float(), ref_out.float(), **TOL[dtype])
    torch.testing.assert_close(lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), rtol=1e-4, atol=1e-4)
    rows_ = torch.tensor([0, 3])
    sk = dict(**b.meta(), rows=rows_, lse=ref_lse, scale=256 ** -0.5, sliding_window=24)
    ref = kernels.pillar_scores(b.q, b.k_cache, **sk, impl="reference")
    got = kernels.pillar_scores(b.q, b.k_cache, **sk, impl="triton")
    torch.testing.assert_close(got.nan_to_num(neginf=0), ref.nan_to_num(neginf=0), rtol=1e-3, atol=1e-6)
