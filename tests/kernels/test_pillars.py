"""pillar_scores and select_pillars: Triton (interpreter) vs reference, and the properties the draft relies on."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from kernel_cases import make_batch, request_masks

from sparsespec_compile import kernels
from sparsespec_compile.kernels.select_triton import select_pillars_triton

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


def _verify_batch(specs, group, d, page, dtype, seed, pad=0):
    hkv = 2
    b = make_batch(specs, hkv * group, hkv, d, page, dtype, seed=seed, pad_tokens=pad)
    _, lse = kernels.unified_attention(b.q, b.k_cache, b.v_cache, **b.meta(), max_query_len=b.max_query_len,
                                       max_seq_len=b.max_seq_len, scale=b.scale, return_lse=True, impl="reference")
    return b, lse


verify_req = st.integers(0, 70).flatmap(lambda c: st.tuples(st.integers(1, 9), st.just(c)))  # (q_len, context)


@SETTINGS
@given(reqs=st.lists(verify_req, min_size=1, max_size=4), group=st.sampled_from([1, 3, 4, 8]),
       d=st.sampled_from([16, 64]), page=st.sampled_from([4, 16]), dtype=st.sampled_from([torch.float32, torch.float16]),
       window=st.sampled_from([-1, 9]), softcap=st.sampled_from([0.0, 5.0]), seed=st.integers(0, 2**16),
       bound=st.sampled_from([None, 0, 7]))
def test_scores_triton_matches_reference(reqs, group, d, page, dtype, window, softcap, seed, bound):
    """``bound``: no max_query_len (the kernel loops over blocks of queries), the exact one (one block: a verify
    chunk's queries x group), or a looser one."""
    specs = [(n, n + c) for n, c in reqs]
    b, lse = _verify_batch(specs, group, d, page, dtype, seed, pad=1)
    rows = torch.tensor([r for r in range(len(specs)) if r != 1], dtype=torch.int64)
    kw = dict(**b.meta(), rows=rows, lse=lse, scale=b.scale, softcap=softcap, sliding_window=window)
    ref = kernels.pillar_scores(b.q, b.k_cache, **kw, impl="reference")
    mq = None if bound is None else max(n for n, _ in specs) + bound
    out = kernels.pillar_scores(b.q, b.k_cache, **kw, max_query_len=mq, impl="triton")
    assert out.shape == ref.shape and ref.shape[-1] == max([max(c, 1) for _, c in (reqs[r] for r in rows.tolist())] + [1])
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    torch.testing.assert_close(out.nan_to_num(neginf=0), ref.nan_to_num(neginf=0), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("tiles,window,mq", [(1, -1, 9), (4, 30, 9), (8, -1, None), (2, 13, None)])
def test_scores_any_launch_shape(tiles, window, mq):
    """Every launch shape the autotuner may pick gives the reference scores (keys are scored independently, so
    the chunking changes only which program writes a key), with chunks wholly below the window (written 0 without
    a load) and wholly past a row's context (-inf), in one block of queries or several."""
    specs = [(9, 9 + 70), (1, 1 + 5), (4, 4 + 33)]
    b, lse = _verify_batch(specs, 3, 16, 4, torch.float32, seed=3)
    kw = dict(**b.meta(), rows=torch.tensor([0, 1, 2]), lse=lse, scale=b.scale, sliding_window=window)
    ref = kernels.pillar_scores(b.q, b.k_cache, **kw, impl="reference")
    from sparsespec_compile.kernels.pillars_triton import pillar_scores_triton

    kw.pop("impl", None)
    out = pillar_scores_triton(b.q, b.k_cache, **kw, max_ctx=ref.shape[-1], max_query_len=mq, block_n=16,
                               tiles=tiles)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    torch.testing.assert_close(out.nan_to_num(neginf=0), ref.nan_to_num(neginf=0), rtol=1e-4, atol=1e-7)


def test_scores_are_mean_probabilities():
    """Scores of the verified context are the verify queries' full-attention probabilities, group/query mean."""
    specs = [(9, 40), (3, 3 + 17)]
    b, lse = _verify_batch(specs, 4, 16, 4, torch.float32, seed=7)
    s = kernels.pillar_scores(b.q, b.k_cache, **b.meta(), rows=torch.tensor([0, 1]), lse=lse, scale=b.scale,
                              max_ctx=64, impl="reference")
    assert s.shape == (2, 2, 64)
    qsl = b.query_start_loc.tolist()
    for j, (n, L) in enumerate(specs):
        qr = b.q[qsl[j]:qsl[j + 1]].double()
        k = b.context(j, b.k_cache).double().repeat_interleave(4, dim=1)
        logits = torch.einsum("nhd,lhd->hnl", qr, k) * b.scale
        logits = logits.masked_fill(~request_masks(b, j, 8, 2), -math.inf)
        p = torch.softmax(logits, -1)[:, :, : L - n]  # [Hq, n, c]
        want = p.reshape(2, 4, n, L - n).mean(dim=(1, 2))
        torch.testing.assert_close(s[j, :, : L - n].double(), want, rtol=1e-5, atol=1e-7)
        assert torch.isinf(s[j, :, L - n:]).all()


@SETTINGS
@given(rv=st.integers(1, 4), hkv=st.integers(1, 3), n=st.integers(1, 150), data=st.data(),
       recent=st.integers(0, 20), ties=st.booleans(), seed=st.integers(0, 2**16),
       method=st.sampled_from(["resident", "radix"]))
def test_select_pillars(rv, hkv, n, data, recent, ties, seed, method):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rv, hkv, n, generator=g)
    if ties:  # few distinct values: exercises the tie rule (lower position wins)
        scores = (scores * 4).floor() / 4
    ctx = torch.tensor(data.draw(st.lists(st.integers(0, n), min_size=rv, max_size=rv)))
    scores[torch.arange(n)[None, None, :] >= ctx[:, None, None].expand(rv, hkv, n)] = -math.inf
    max_budget = data.draw(st.integers(1, 64))
    budget = torch.tensor(data.draw(st.lists(st.integers(0, max_budget), min_size=rv, max_size=rv)))
    ref_i, ref_l = kernels.select_pillars(scores, ctx, budget, recent, max_budget, impl="reference")
    out_i, out_l = select_pillars_triton(scores, ctx, budget, recent, max_budget, method=method)
    assert out_i.shape == (rv, hkv, max_budget) and out_i.dtype == torch.int32 and out_l.dtype == torch.int32
    assert torch.equal(out_l, ref_l)
    for j in range(rv):
        b, c = int(out_l[j]), int(ctx[j])
        assert b == min(int(budget[j]), c)
        newest = set(range(c - min(recent, b), c))
        for h in range(hkv):
            sel = out_i[j, h, :b]
            assert torch.equal(sel, ref_i[j, h, :b])
            assert len(set(sel.tolist())) == b and (sel >= 0).all() and (sel < c).all()  # b distinct, valid
            assert torch.equal(sel, sel.sort().values)
            assert newest <= set(sel.tolist())
            if b:  # every kept position (outside the forced newest) scores >= every dropped one
                kept = [t for t in sel.tolist() if t not in newest]
                dropped = sorted(set(range(c)) - set(sel.tolist()))
                if kept and dropped:
                    assert scores[j, h, kept].min() >= scores[j, h, dropped].max()


@pytest.mark.parametrize("n,method", [(40, "radix"), (300, "radix"), (40, "resident"), (300, "resident")])
def test_select_pillars_extreme_scores(n, method):  # radix: one chunk and several (the interpreter's is 64 keys)
    """+inf ranks as the largest finite score, below the forced newest positions; NaN and 0 rank lowest among valid
    positions (ties: lower position first). Kernel and reference agree, and the newest are always kept."""
    g = torch.Generator().manual_seed(n)
    scores = torch.rand(2, 2, n, generator=g)
    scores[..., ::7] = math.inf
    scores[..., 3::11] = math.nan
    scores[..., 5::13] = 0.0
    recent = 6
    ctx, budget = torch.tensor([n, n - 9]), torch.tensor([n // 3, recent + 2])  # room for all +infs / for 2
    ref_i, ref_l = kernels.select_pillars(scores, ctx, budget, recent, n, impl="reference")
    out_i, out_l = select_pillars_triton(scores, ctx, budget, recent, n, method=method)
    assert torch.equal(out_l, ref_l) and torch.equal(out_i, ref_i)
    for j in range(2):
        c, b = int(ctx[j]), int(out_l[j])
        for h in range(2):
            sel = set(out_i[j, h, :b].tolist())
            newest = set(range(c - recent, c))
            assert newest <= sel
            infs = torch.isposinf(scores[j, h, :c - recent]).nonzero().flatten().tolist()
            if len(infs) + recent <= b:  # every +inf kept, then the best finite ones
                assert set(infs) <= sel
            else:  # only +infs besides the newest, the lowest positions first
                assert sel - newest == set(infs[:b - recent])


@pytest.mark.parametrize("case", ["all_equal", "keep_all", "forced_fill", "zeros_nans", "one_key", "softmax_dups",
                                  "budget_one"])
@pytest.mark.parametrize("method", ["resident", "radix"])
def test_select_edges(case, method):
    """Both select kernels equal the reference where the threshold search is degenerate: every key tied, the budget
    the whole context, the forced newest filling the budget, no positive score, one key, probability-like rows with
    duplicated values (the bisection stops early or runs to a one-value interval), a budget of one."""
    g = torch.Generator().manual_seed(len(case))
    n, recent = 200, 4
    scores = torch.softmax(torch.randn(3, 2, n, generator=g) * 3, -1)
    ctx, budget = torch.tensor([n, 150, 97]), torch.tensor([30, 40, 13])
    if case == "all_equal":
        scores.fill_(0.25)
    elif case == "keep_all":
        budget = ctx.clone()
    elif case == "forced_fill":
        budget, recent = torch.tensor([3, 4, 2]), 4
    elif case == "zeros_nans":
        scores.fill_(0.0)
        scores[..., ::3] = math.nan
    elif case == "one_key":
        ctx, budget = torch.tensor([1, 1, 0]), torch.tensor([1, 5, 1])
    elif case == "softmax_dups":
        scores = (scores * 64).round() / 64  # a handful of distinct values, many ties at the threshold
    elif case == "budget_one":
        budget, recent = torch.tensor([1, 1, 1]), 0
    max_budget = int(budget.max())
    ref_i, ref_l = kernels.select_pillars(scores, ctx, budget, recent, max_budget, impl="reference")
    out_i, out_l = select_pillars_triton(scores, ctx, budget, recent, max_budget, method=method)
    assert torch.equal(out_l, ref_l) and torch.equal(out_i, ref_i)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(n=st.integers(1, 3000), sharp=st.sampled_from([0.5, 3.0, 12.0]), frac=st.floats(0.0, 1.0),
       recent=st.integers(0, 64), quant=st.sampled_from([0, 256]), seed=st.integers(0, 2**16))
def test_select_resident_long_rows(n, sharp, frac, recent, quant, seed):
    """The bisection on register-resident rows equals the reference on probability-like rows up to 3,000 keys (a
    B 256 x 4k step's rows are ~4k): flat to peaked, optionally quantised to few distinct values (ties)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(2, 3, n, generator=g) * sharp, -1)
    if quant:
        scores = (scores * quant * n).round() / (quant * n)
    ctx = torch.tensor([n, max(0, n - 7)])
    budget = (ctx.float() * frac).long().clamp(min=1)
    max_budget = int(budget.max())
    ref_i, ref_l = kernels.select_pillars(scores, ctx, budget, recent, max_budget, impl="reference")
    out_i, out_l = select_pillars_triton(scores, ctx, budget, recent, max_budget, method="resident")
    assert torch.equal(out_l, ref_l) and torch.equal(out_i, ref_i)
