"""write_kv: Triton (interpreter) vs reference, with strided k/v views and padding slots."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsespec_compile import kernels


@settings(max_examples=10, deadline=None, derandomize=True)
@given(t=st.integers(0, 20), hkv=st.integers(1, 3), d=st.sampled_from([8, 64, 128]), page=st.sampled_from([1, 4, 16]),
       dtype=st.sampled_from([torch.float32, torch.float16]), src32=st.booleans(), seed=st.integers(0, 2**16))
def test_write_kv_matches_reference(t, hkv, d, page, dtype, src32, seed):
    g = torch.Generator().manual_seed(seed)
    pages = 24  # >= T even with one-token pages
    kc = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    vc = torch.randn(pages, page, hkv, d, generator=g).to(dtype)
    # k, v come from a [1, Hkv, T, D] tensor as k.transpose(1, 2)[0]: strided [T, Hkv, D] views
    k = torch.randn(1, hkv, t, d, generator=g).to(torch.float32 if src32 else dtype).transpose(1, 2)[0]
    v = torch.randn(1, hkv, t, d, generator=g).to(torch.float32 if src32 else dtype).transpose(1, 2)[0]
    slots = torch.randperm(pages * page, generator=g)[:t]
    slots[torch.rand(t, generator=g) < 0.3] = -1
    want_k, want_v, got_k, got_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    kernels.write_kv(want_k, want_v, k, v, slots, impl="reference")
    kernels.write_kv(got_k, got_v, k, v, slots, impl="triton")
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(got_k[s // page, s % page], k[i].to(dtype))


def test_write_kv_rejects_bad_shapes():
    kc = torch.zeros(2, 4, 2, 8)
    with pytest.raises(ValueError, match="slot_mapping"):
        kernels.write_kv(kc, kc.clone(), torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), torch.zeros(2, dtype=torch.int64),
                         impl="reference")
    with pytest.raises(ValueError, match=r"\[T, Hkv, D\]"):
        kernels.write_kv(kc, kc.clone(), torch.zeros(3, 1, 8), torch.zeros(3, 1, 8), torch.zeros(3, dtype=torch.int64),
                         impl="reference")
