"""The public checks of issue 7 pass on a healthy runtime and catch planted faults (mutation tests).

Fault -> the check that must catch it:
* verification accepts every draft (a biased greedy acceptance rule)      -> check_lossless (tokens differ)
* after a verify the KV bookkeeping skips an accepted token                -> check_lossless (tokens differ)
* a draft step feeds the wrong token (the one before the newest draft)     -> check_lossless(dense_drafts=True):
  the tokens stay equal (verification throws wrong drafts away: that is what makes speculation lossless), but
  with a budget covering the context the drafts must all be accepted, and they are not
* the scheduler drops a cycle's last draft from the verify chunk           -> check_lossless (no full cycle)
* the residual is sampled from p instead of max(p - q, 0)                  -> check_sampling
* the rewrite drops the attention scale                                    -> check_rewrite
  (tests/test_rewrite_faults.py; here through the CLI's table)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import Phase, given, settings

from sparsespec_compile.cli import main
from sparsespec_compile.kernels import sampling_reference as ref
from sparsespec_compile.runtime import scheduler as sched
from sparsespec_compile.runtime import verify
from sparsespec_compile.runtime.scheduler import StepKind
from sparsespec_compile.testing import (FAMILIES, check_lossless, check_sampling, inputs_for, prompts_from_inputs,
                                        speculation_settings, tiny_model)

CONFIG = FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def model():
    return tiny_model(CONFIG)


def test_check_lossless_passes_and_drafts_are_really_sparse(model):
    r = check_lossless(model, stride=4, budget=8)
    assert r.num_requests == 3 and r.num_tokens == 48
    assert r.cycles > 0 and r.acceptance < 1.0  # budget 8 < the 27-token prompt: some drafts were rejected
    assert r.graphs_compiled <= 3 and len(r.token_counts) > r.graphs_compiled


# No explain phase: its tracer (sys.settrace) made one Dynamo compile take minutes. Found with this test: the
# HF reference must not suppress EOS (min_new_tokens does) where the runtime's ignore_eos only keeps going.
@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate, Phase.shrink])
@given(inputs=inputs_for(CONFIG, max_len=20, padding=True), s=speculation_settings(max_stride=4, budgets=(1, 3)))
def test_check_lossless_under_given_with_padded_inputs(model, inputs, s):
    check_lossless(model, inputs, max_new_tokens=6, **s.kwargs)


def test_prompts_from_inputs_strips_left_padding():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert prompts_from_inputs({"input_ids": ids, "attention_mask": mask}) == [[5, 6], [7, 8, 9, 10]]
    assert prompts_from_inputs([5, 6]) == [[5, 6]] and prompts_from_inputs(ids[1]) == [[7, 8, 9, 10]]
    with pytest.raises(ValueError, match="at least one token"):
        prompts_from_inputs([[5], []])


def _accept_every_draft(drafts, target_tokens, num_drafts=None):
    n, k = drafts.shape
    nd = torch.full((n,), k) if num_drafts is None else num_drafts
    rows = torch.arange(n)
    tokens = torch.cat([drafts, drafts.new_zeros(n, 1)], 1)
    tokens[rows, nd] = target_tokens[rows, nd]  # the bonus after the (wrongly) accepted drafts
    return nd.clone(), tokens.masked_fill(torch.arange(k + 1) > nd.view(-1, 1), -1)


def test_biased_greedy_acceptance_is_caught(model, monkeypatch):
    monkeypatch.setattr(verify, "greedy_accept", _accept_every_draft)  # rejection_sample's greedy path calls it
    with pytest.raises(AssertionError, match=r"request \d+ \(stride=4, budget=8.*diverges from HF greedy generate at "
                                             r"output position \d+ .*speculative token \d+ vs HF token \d+"):
        check_lossless(model, stride=4, budget=8)


def test_kv_that_skips_an_accepted_token_is_caught(model, monkeypatch):
    real_update = sched.Scheduler.update

    def update(self, plan, sampled):
        real_update(self, plan, sampled)
        for e in plan.entries:  # one token too few committed: the next step overwrites the last accepted one's KV
            if e.kind is StepKind.VERIFY and not e.request.is_finished:
                e.request.num_computed_tokens -= 1

    monkeypatch.setattr(sched.Scheduler, "update", update)
    with pytest.raises(AssertionError, match="diverges from HF greedy generate at output position"):
        check_lossless(model, stride=4, budget=8)


def test_draft_fed_the_wrong_token_is_caught_by_dense_drafts(model, monkeypatch):
    real_entry = sched.Scheduler._decode_entry

    def entry(self, r):
        e = real_entry(self, r)
        i = len(r.draft_token_ids)
        if e.kind is StepKind.DRAFT and i >= 1:  # feed the token before the newest draft: one draft skipped
            e = dataclasses.replace(e, token_ids=(([r.last_token_id] + r.draft_token_ids)[i - 1],))
        return e

    monkeypatch.setattr(sched.Scheduler, "_decode_entry", entry)
    # The sparse run's tokens still equal HF's (verification rejects the wrong drafts: it is the dense run that
    # raises), but with a budget covering the context every draft must be accepted.
    with pytest.raises(AssertionError, match=r"dense drafts == the target\), only 0\.\d+ of the drafts were accepted"):
        check_lossless(model, stride=4, budget=8, dense_drafts=True)


def test_scheduler_dropping_a_draft_is_caught(model, monkeypatch):
    real_entry = sched.Scheduler._decode_entry

    def entry(self, r):
        e = real_entry(self, r)
        if e.kind is StepKind.VERIFY and e.num_tokens > 1:  # the last draft never reaches verification
            e = dataclasses.replace(e, token_ids=e.token_ids[:-1], num_logits=e.num_logits - 1)
        return e

    monkeypatch.setattr(sched.Scheduler, "_decode_entry", entry)
    with pytest.raises(AssertionError, match="no verify step judged 4 drafts"):
        check_lossless(model, stride=4, budget=8)


def test_check_sampling_passes(model):
    r = check_sampling(model, num_cycles=20_000, num_requests=32)
    assert min(r.slot_pvalues) > 1e-6 and abs(r.acceptance - r.acceptance_expected) < 0.02
    assert r.engine_tokens == 32 * 8 and abs(r.engine_z) < 5


def test_biased_residual_is_caught_by_check_sampling(model, monkeypatch):
    def from_p(t, ts, d, ds, it, seeds):  # sample the rejected slot from p, not max(p - q, 0)
        p = ref.row_probs(t.float() * it.unsqueeze(-1), ts)
        return (p / -ref.uniform(seeds, torch.arange(p.shape[-1]).expand_as(p)).log()).argmax(-1)

    monkeypatch.setattr(ref, "residual_reference", from_p)
    with pytest.raises(AssertionError, match=r"sampler slot 0: emitted tokens do not fit the target p_0: chi-square "
                                             r"p-value \S+ \(bound 1e-06\)"):
        check_sampling(model, num_cycles=20_000, num_requests=0)


CLI_FAST = ["--num-cycles", "5000", "--num-requests", "8", "--max-new-tokens", "12", "--no-progress"]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    CONFIG.save_pretrained(path)
    return path


def test_cli_check_passes_on_a_healthy_tiny_config(config_dir, capsys):
    assert main(["check", str(config_dir), *CLI_FAST]) == 0
    out = capsys.readouterr().out
    for row in ("causal LM", "rewrite coverage", "logits equivalence", "greedy lossless", "sampling distribution",
                "recompilation count"):
        assert row in out
    assert "6/6 checks passed" in out and "FAIL" not in out


def test_cli_check_fails_on_a_planted_fault(config_dir, capsys, monkeypatch):
    monkeypatch.setattr(verify, "greedy_accept", _accept_every_draft)  # rejection_sample's greedy path calls it
    assert main(["check", str(config_dir), *CLI_FAST]) == 1
    out = capsys.readouterr().out
    assert "greedy lossless (sparse drafts)  FAIL" in out and "diverges from HF greedy generate" in out


# ---- issue 15.5 -------------------------------------------------------------------------------------------------
def test_check_lossless_on_a_config_with_output_attentions():
    """The HF greedy reference crashed ('tuple indices must be integers or slices, not tuple'): generate returns a
    ModelOutput when the config asks for attentions. The runtime asks for none (the rewrite would leave the
    softmax alone if the attention weights were an output)."""
    config = FAMILIES["llama"].config(layers=2, heads=4, kv_heads=2, output_attentions=True)
    check_lossless(tiny_model(config, "eager"), stride=2, budget=4, max_new_tokens=6)


def test_cli_check_says_a_non_decoder_is_not_a_causal_lm(tmp_path, capsys):
    """It reported a greedy 'divergence at position 12' for a bidirectional model."""
    import transformers

    transformers.BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=64, is_decoder=False).save_pretrained(tmp_path)
    assert main(["check", str(tmp_path), *CLI_FAST]) == 1
    out = capsys.readouterr().out
    assert "causal LM                        FAIL" in out and "does not attend causally" in out
    assert "greedy lossless (sparse drafts)  SKIP" in out and "diverges" not in out
