"""A speculative step launches no more kernels per layer than a plain (stride-0) step plus two: the step's work plan
is built once and shared by every layer, the draft and verify rows go through one attention launch, and the pillar
selection runs once per step for all layers. Counted on the Triton interpreter through the padded (graph) path."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model

LAYERS = 2
PER_STEP = {"_select_resident_kernel", "_select_radix_kernel"}  # once per step, all layers at once


def _launches_per_forward(stride, monkeypatch):
    import sparsespec_compile.runtime.cuda_graphs as cuda_graphs

    launches: list[Counter] = []
    real_run, real_forward = InterpretedFunction.run, cuda_graphs.run_packed

    def counting_run(self, *a, **k):
        if launches:
            launches[-1][self.fn.__name__] += 1
        return real_run(self, *a, **k)

    def counting_forward(*a, **k):
        launches.append(Counter())
        return real_forward(*a, **k)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    monkeypatch.setattr(cuda_graphs, "run_packed", counting_forward)
    fam = FAMILIES["llama"]
    model = tiny_model(fam.config(layers=LAYERS, heads=4, kv_heads=2, head_dim=8), attn="sdpa", seed=0)
    torch._dynamo.reset()
    llm = LLM(model, SparseSpecConfig(adaptive=False, compiler="eager", num_pages=64, page_size=4, stride=stride, min_budget=3,
                                      recent=1, cuda_graphs="pad", attention_impl="triton"))
    llm.generate([[5, 6, 7, 8, 9, 10, 11], list(range(20, 37))], SamplingParams(max_tokens=8, ignore_eos=True),
                 use_tqdm=False)
    monkeypatch.undo()
    return launches


def _per_layer(c: Counter) -> float:
    return sum(n for name, n in c.items() if name not in PER_STEP) / LAYERS


@pytest.mark.parametrize("stride", [3])
def test_speculative_step_launches_at_most_two_more_kernels_per_layer(stride, monkeypatch):
    plain = _launches_per_forward(0, monkeypatch)
    spec = _launches_per_forward(stride, monkeypatch)
    assert plain and spec
    scored = [c for c in spec if c["_scores_kernel"]]
    assert scored, "no verify step was scored"
    assert all(sum(c[k] for k in PER_STEP) <= 1 for c in spec)  # one selection for every layer
    worst_plain = max(_per_layer(c) for c in plain)
    assert max(_per_layer(c) for c in spec) <= worst_plain + 2, (plain, spec)
    assert all(c["_attn_kernel"] == LAYERS for c in plain + spec)  # one attention launch per layer, mixed rows too
