"""Which engines feed the step-cost model: only the adaptive stride reads its prices, so with a fixed stride the
engine must not fit them (the fit cost 0.6-1.0 ms of host a step, step_resolve.py), and with the adaptive stride
every resolved step must reach it — synchronously and with host/device overlap."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.step_cost import StepCostModel
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model

PROMPTS = [list(range(5, 17)), list(range(30, 39))]


@pytest.fixture(scope="module")
def model():
    return tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2, head_dim=8), attn="sdpa", seed=0)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_only_the_adaptive_stride_feeds_the_step_cost_model(model, adaptive, overlap):
    torch._dynamo.reset()
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=4, adaptive=adaptive, overlap=overlap, num_pages=64,
                                      page_size=4, min_budget=16, recent=1, max_num_batched_tokens=64))
    cost = llm.engine.step_cost
    assert isinstance(cost, StepCostModel) and cost.observed == 0
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert all(len(o.token_ids) == 10 for o in outs)
    steps = llm.engine.stats.steps
    assert steps > 0 and llm.engine.step_cost is cost
    if adaptive:  # every step priced: taken into the fit, or left out of it as a stall (on a loaded CPU)
        assert cost.observed > 0 and cost.observed + cost.rejected == steps
    else:
        assert cost.observed == 0 and cost.rejected == 0
