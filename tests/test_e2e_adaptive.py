"""End to end, the adaptive per-request stride: a request whose drafts never match (a planted bad draft) falls to plain
decoding within a few cycles while the others keep speculating, in the same steps, and every output still equals HF
greedy — synchronously and with host/device overlap (where its plain decodes run on placeholders between the
others' delayed verifications). Prices are injected: CPU step times say nothing about a GPU's."""

from __future__ import annotations

import pytest
import torch

from sparsespec_compile import LLM, SamplingParams, SparseSpecConfig
from sparsespec_compile.runtime.step_sampler import StepSampler
from sparsespec_compile.runtime.step_cost import FixedStepCost
from sparsespec_compile.runtime.step_plan import StepKind
from sparsespec_compile.runtime.stride_policy import PROBE_DRAFTS
from sparsespec_compile.testing import FAMILIES
from sparsespec_compile.testing.checks import tiny_model
from sparsespec_compile.testing.lossless import hf_greedy

PROMPTS = [list(range(5, 25)), list(range(30, 45)), list(range(50, 72))]
MAX_NEW = 40


@pytest.fixture(scope="module")
def model():
    return tiny_model(FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2, head_dim=8), attn="sdpa", seed=0)


@pytest.mark.parametrize("overlap", [False, True])
def test_planted_bad_draft_falls_to_plain_decoding_others_keep_speculating(model, monkeypatch, overlap):
    ref = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
    vocab = model.config.vocab_size
    real = StepSampler.run

    def sample_and_verify(self, plan, *args):  # the first prompt's drafts are always wrong, on the device
        res = real(self, plan, *args)
        for j, i in enumerate(res.sample_rows):
            e = plan.entries[i]
            if e.kind is StepKind.DRAFT and e.request.prompt_token_ids == PROMPTS[0]:
                res.sampled[j] = (res.sampled[j] + 1) % vocab
        return res

    monkeypatch.setattr(StepSampler, "run", sample_and_verify)
    torch._dynamo.reset()
    # budget >= every context: drafts equal full attention, so every draft of the others is accepted
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=4, num_pages=128, page_size=4, min_budget=96,
                                      recent=1, max_num_batched_tokens=64, overlap=overlap))
    assert llm.config.adaptive  # the default
    llm.engine.use_step_cost(FixedStepCost(0.0, 0.0, 1.0, 0.1))  # keys dominate; sparse keys 10x cheaper
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == ref  # lossless
    bad, good = outs[0].metrics, [o.metrics for o in outs[1:]]
    spec = [j for j in bad["drafted"] if j > PROBE_DRAFTS]
    assert len(spec) <= 3 and sum(bad["accepted"]) == 0, bad["drafted"]  # gave up within a few cycles
    assert bad["drafted"].count(0) >= len(bad["drafted"]) - 5 and bad["mean_k"] < 1
    for m in good:  # kept speculating at the full stride, everything accepted
        assert m["drafted"][0] == 0 and m["drafted"][1] == 4 and m["per_position_acceptance"] == [1.0] * 4
    stats = llm.stats()
    assert stats["adaptive"] and stats["cycles_by_k"][0] > 0 and stats["cycles_by_k"][4] > 0
    assert 0 < stats["mean_k"] < 4 and stats["tokens_per_step"] > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_gate_alternates_plain_and_speculative_rounds_losslessly(model, monkeypatch, overlap):
    """The default config's speculation gate on a real engine: plain rounds make stride-0 steps (no draft, no
    scored row), speculative rounds draft, a round's goodputs are measured, and outputs equal HF greedy."""
    from sparsespec_compile.runtime.speculation_gate import SpeculationGate
    from sparsespec_compile.runtime.step_plan import Refresh

    ref = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
    torch._dynamo.reset()
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=4, num_pages=128, page_size=4, min_budget=96,
                                      recent=1, max_num_batched_tokens=64, overlap=overlap))
    assert llm.engine.gate is not None  # the default: adaptive with the gate
    # plain always wins (a margin no measurement beats): the schedule, and so the test, does not depend on timings
    gate = SpeculationGate(warm=2, window=6, exploit_first=8, exploit_max=8, margin=1e9)
    llm.engine.use_step_cost(FixedStepCost(0.0, 0.0, 1.0, 0.1))  # prices that speculate (CPU times would not)...
    llm.engine.use_gate(gate)  # ... with the gate back on top (use_step_cost removes it)
    modes = []
    real = StepSampler.run

    def record(self, plan, *args):
        kinds = {e.kind for e in plan.entries}
        scored = any(e.refresh is Refresh.SCORE for e in plan.entries)
        modes.append((gate.mode, StepKind.DRAFT in kinds, scored, StepKind.PREFILL in kinds))
        return real(self, plan, *args)

    monkeypatch.setattr(StepSampler, "run", record)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outs] == ref  # lossless in both modes and across the switches
    assert gate.rounds >= 1 and set(gate.goodput) == {"plain", "speculate"} and gate.winner == "plain"
    # plain steps well inside a plain span (past the cycles a switch leaves in flight) are stride-0 steps
    runs = [i for i in range(8, len(modes)) if all(m[0] == "plain" for m in modes[i - 8:i + 1])]
    assert runs and not any(modes[i][1] or modes[i][2] for i in runs if not modes[i][3])
    assert any(m[0] == "speculate" and m[1] for m in modes)  # speculative rounds do draft
    assert llm.stats()["speculation_gate"]["rounds"] == gate.rounds


def test_warming_up_speculates_whatever_the_gate_would_choose(model):
    """A warm-up meets the speculative steps at the full stride (the gate alone would decode plainly first) and
    leaves the adaptive stride with a fresh gate of the same schedule: the serve and benchmark warm-ups compile the
    speculative kernels and graphs."""
    from sparsespec_compile.runtime.speculation_gate import PLAIN, SpeculationGate

    torch._dynamo.reset()
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=4, num_pages=128, page_size=4, min_budget=96,
                                      recent=1, max_num_batched_tokens=64, overlap=False))
    llm.engine.use_gate(SpeculationGate(warm=3, window=5))
    before = llm.engine.gate
    with llm.warming_up():
        llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12, ignore_eos=True), use_tqdm=False)
    # the full stride (the prices alone would keep these short contexts plain: [22, 0, 0, 0, 0] cycles by k)
    assert llm.stats()["cycles_by_k"][4] > 0, llm.stats()["cycles_by_k"]
    assert llm.engine.scheduler.planner.policy.adaptive
    after = llm.engine.gate
    assert after is not before and after.mode == PLAIN and after.rounds == 0
    assert (after.warm, after.window) == (3, 5) and after.remaining is not None


def test_serve_warm_up_meets_a_prefill_beside_drafting_rows(model):
    """``sparsespec serve``'s warm-up runs drafts, verifies and a prefill chunk in the same step as drafting rows
    (that eager mix compiles kernel variants of its own), then leaves the adaptive default and zeroed stats."""
    from sparsespec_compile.serve import warm_up

    torch._dynamo.reset()
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=4, num_pages=128, page_size=4, min_budget=96,
                                      recent=1, max_num_batched_tokens=64, overlap=False))
    kinds = []
    schedule = llm.engine.scheduler.schedule

    def recording():
        plan = schedule()
        kinds.append({e.kind for e in plan.entries})
        return plan

    llm.engine.scheduler.schedule = recording
    warm_up(llm)
    assert any({StepKind.PREFILL, StepKind.DRAFT} <= k for k in kinds), kinds
    assert any(StepKind.VERIFY in k for k in kinds)
    assert llm.stats()["steps"] == 0 and llm.engine.scheduler.planner.policy.adaptive


def test_serve_warm_up_runs_every_batch_size_before_the_first_client(model):
    """After ``sparsespec serve``'s warm-up, a full batch of ``max_num_seqs`` short requests decodes in step shapes
    the warm-up already ran: the walk down the batch sizes met every request bucket (padded steps stand in for CUDA
    graphs on the CPU, one per shape as captured). The warm-up's three requests alone meet buckets 1, 2 and 4."""
    from sparsespec_compile.serve import warm_up

    torch._dynamo.reset()
    llm = LLM(model, SparseSpecConfig(compiler="eager", stride=4, num_pages=512, page_size=4, max_num_seqs=12,
                                      min_budget=96, recent=1, max_num_batched_tokens=64, overlap=False,
                                      cuda_graphs="pad"))
    warm_up(llm)
    shapes = llm.engine.graphs.num_graphs
    outs = llm.generate([[5 + i, 6, 7] for i in range(12)], SamplingParams(max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.token_ids) == 6 for o in outs)
    assert llm.stats()["mean_k"] == 0  # plain, as the gate's first round and short requests are
    assert llm.engine.graphs.num_graphs == shapes
    with pytest.raises(ValueError, match="warming_up"):
        with llm.warming_up(stride=5):
            pass

