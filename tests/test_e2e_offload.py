"""End to end, the dynamic KV cache and delayed verification: with a device pool just above one request's need and
six requests, every request finishes with exactly HF's greedy output — the same as an unconstrained run — by
offloading to the host pool (no recompute when it suffices; recompute preemption, logged and counted, when it is
full); with delayed verification (``overlap``) on, a request that verified at step i sits out step i+1 and the
outputs do not change."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile.testing.lossless import hf_greedy as reference_greedy
from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.scheduler import StepKind
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model

PAGE, STRIDE, MAX_NEW = 4, 3, 16
PROMPTS = [[5, 6, 7, 8, 9], [12, 13, 14, 15, 16, 17, 18], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30],
           [40, 41, 42, 43, 44, 45], [50, 51, 52, 53, 54, 55, 56, 57], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
# One request's worst case: prompt + max_tokens + stride tokens = ceil((11 + 16 + 3) / 4) = 8 pages.
ONE_REQUEST = -(-(max(map(len, PROMPTS)) + MAX_NEW + STRIDE) // PAGE)
PARAMS = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    fam = FAMILIES["llama"]
    return tiny_model(fam.config(layers=2, heads=4, kv_heads=2, head_dim=8), attn="sdpa", seed=0)


@pytest.fixture(scope="module")
def hf_greedy(model):
    return [reference_greedy(model, p, MAX_NEW) for p in PROMPTS]


@pytest.fixture(scope="module")
def compiled(model):
    """One compiled graph for every run of this file (a fresh compile per run would cost most of its time)."""
    torch._dynamo.reset()
    return torch.compile(model, backend="sparsespec", options={"compiler": "eager"})


def _run(compiled, **cfg):
    """Generate PROMPTS; returns (outputs, finished Request objects, every StepPlan, the engine)."""
    base = dict(adaptive=False, compiler="eager", page_size=PAGE, max_num_batched_tokens=32, recent=1, stride=STRIDE, min_budget=3)
    llm = LLM(compiled, SparseSpecConfig(**{**base, **cfg}))
    eng, plans, finished = llm.engine, [], []
    schedule, step = eng.scheduler.schedule, eng.step

    def recording_schedule():
        plans.append(schedule())
        return plans[-1]

    def recording_step():
        done = step()
        finished.extend(done)
        return done

    eng.scheduler.schedule, eng.step = recording_schedule, recording_step
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return outs, finished, plans, eng


def test_tiny_pool_offloads_and_matches_hf_and_an_unconstrained_run(compiled, hf_greedy):
    free, _, _, free_eng = _run(compiled, num_pages=96, overlap=False)
    assert [o.token_ids for o in free] == hf_greedy and free_eng.scheduler.num_swap_outs == 0
    outs, reqs, plans, eng = _run(compiled, num_pages=ONE_REQUEST + 1, host_kv_pages=6 * ONE_REQUEST, overlap=False)
    assert [o.token_ids for o in outs] == hf_greedy and all(o.finish_reason == "length" for o in outs)
    s, pool = eng.scheduler, eng.offload
    assert s.num_swap_outs > 0 and s.num_swap_ins == s.num_swap_outs and s.num_recomputes == 0
    assert sum(r.metrics.num_offloads for r in reqs) == s.num_swap_outs
    assert all(r.metrics.num_preemptions == r.metrics.offload_fallbacks == 0 for r in reqs)
    assert (pool.stats.swaps_out, pool.stats.swaps_in) == (s.num_swap_outs, s.num_swap_ins)
    assert pool.stats.pages_out == pool.stats.pages_in > 0
    assert s.allocator.num_free == s.allocator.num_blocks and s.host.num_free == s.host.num_blocks
    # nothing recomputed: each prompt prefilled exactly once, never prompt + output
    for r in reqs:
        assert sum(e.num_tokens for p in plans for e in p.entries
                   if e.request is r and e.kind is StepKind.PREFILL) == r.num_prompt_tokens
    assert any(e.sparse for p in plans for e in p.entries)  # restored pillar rows were really read


def test_full_host_pool_falls_back_to_recompute_losslessly(compiled, hf_greedy, caplog):
    with caplog.at_level("WARNING", logger="sparsespec.runtime"):
        outs, reqs, _, eng = _run(compiled, num_pages=ONE_REQUEST + 1, host_kv_pages=2, overlap=False)
    assert [o.token_ids for o in outs] == hf_greedy
    assert eng.scheduler.num_recomputes > 0 and "host KV pool full" in caplog.text
    assert sum(r.metrics.offload_fallbacks for r in reqs) == eng.scheduler.num_recomputes
    assert sum(o.metrics["preemptions"] for o in outs) == eng.scheduler.num_recomputes


@pytest.mark.parametrize("num_pages", [96, ONE_REQUEST + 1])
def test_delayed_verification_sits_out_one_step_and_changes_no_output(compiled, hf_greedy, num_pages):
    outs, _, plans, eng = _run(compiled, num_pages=num_pages, host_kv_pages=6 * ONE_REQUEST, overlap=True)
    assert eng.scheduler.delayed_verify and eng.scheduler.cycle_len == STRIDE + 2
    assert [o.token_ids for o in outs] == hf_greedy  # == the overlap-off runs above (both == HF)
    stalls = 0
    for prev, cur in zip(plans, plans[1:]):
        verified = {e.request.request_id for e in prev.entries if e.kind is StepKind.VERIFY}
        assert not verified & {e.request.request_id for e in cur.entries}, cur.step
        stalls += len(verified)
    assert stalls > 0
    assert max(p.num_tokens for p in plans) <= 32  # every step within max_num_batched_tokens
    if num_pages < 96:
        assert eng.scheduler.num_swap_outs > 0 and eng.scheduler.num_recomputes == 0
