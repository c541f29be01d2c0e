"""Sampling and verification of one step's logits: which rows sample, which verify, what a sampled draft keeps
for its verification (its q_i), and the log-probs asked for. Results stay on the device (StepResults)."""

from __future__ import annotations

import torch

from .host_copy import to_device
from .logprobs import step_logprobs, wants_logprobs
from .request import Request
from .step_plan import StepEntry, StepKind, StepPlan
from .step_results import StepResults
from .verify import PositionSeed, rejection_sample, sample


def _params(reqs: list[Request]):
    """One SamplingParams when every request shares it (LLM.generate's usual case: built on the device with
    torch.full, no host list -> device copy), else one per row."""
    first = reqs[0].params
    return first if all(r.params is first for r in reqs) else [r.params for r in reqs]


def _position_seeds(entries: list[StepEntry]) -> list[PositionSeed | None] | None:
    """Noise of seeded requests keyed by the output position each row samples (verify.PositionSeed): a draft
    predicts position len(output) + drafts so far; a verify chunk's slot s, len(output) + s; a prompt's end or a
    plain decode, len(output). None when no request is seeded (the engine's shared generator)."""
    seeds = [None if e.request.params.seed is None else PositionSeed(
        e.request.params.seed,
        len(e.request.output_token_ids) + (len(e.request.draft_token_ids) if e.kind is StepKind.DRAFT else 0))
        for e in entries]
    return seeds if any(s is not None for s in seeds) else None


class StepSampler:
    """The engine's sampling and verification; ``draft_probs``: request id -> q_i of this cycle's sampled drafts
    ([V] each), kept from their step to their verification (offloaded requests keep theirs: they resume
    mid-cycle)."""

    def __init__(self) -> None:
        self.draft_probs: dict[int, list[torch.Tensor]] = {}

    def forget(self, requests: list[Request]) -> None:
        for r in requests:
            self.draft_probs.pop(r.request_id, None)

    def run(self, plan: StepPlan, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> StepResults:
        """Launch sampling and verification for the plan; nothing is read on the host here (StepResults.lists()).
        ``input_ids``: the [T] ids the step ran on (device); when given, verify drafts are gathered from it (their
        values may be device-side placeholders the host does not know yet) and kept in the results."""
        rows, sample_rows, sample_logit_rows, verify_entries = 0, [], [], []
        for i, e in enumerate(plan.entries):
            # A verify of no drafts (every plain decode at stride 0) is a plain sample from the target: one sampled
            # row, which overlap can hand to the next step as a placeholder like a draft's.
            if e.num_logits and (e.kind is not StepKind.VERIFY or e.num_tokens == 1):
                sample_rows.append(i)
                sample_logit_rows.append(rows)
            elif e.kind is StepKind.VERIFY:
                verify_entries.append((i, rows))
            rows += e.num_logits
        sampled = verify_tokens = target = None
        if sample_rows:
            reqs = [plan.entries[i].request for i in sample_rows]
            sampled, probs = sample(logits[to_device(sample_logit_rows, logits.device)], _params(reqs),
                                    _position_seeds([plan.entries[i] for i in sample_rows]))
            rows_of = None  # one unbind for the step, not a select per draft (~57 per step at B 64: host time)
            for j, i in enumerate(sample_rows):  # keep q_i of sampled drafts for their verification
                e = plan.entries[i]
                if e.kind is StepKind.DRAFT and not e.request.params.greedy:
                    rows_of = rows_of or probs.unbind(0)
                    self.draft_probs.setdefault(e.request.request_id, []).append(rows_of[j])
        if verify_entries:
            verify_tokens, target = self._verify(plan, logits, verify_entries, input_ids)
        res = StepResults(plan, sample_rows, sampled, [i for i, _ in verify_entries], verify_tokens, input_ids)
        if any(wants_logprobs(e) for e in plan.entries):
            res.logprobs = self._logprobs(plan, logits, sample_rows, sample_logit_rows, sampled, verify_entries,
                                          target, verify_tokens)
        return res

    def _logprobs(self, plan, logits, sample_rows, sample_logit_rows, sampled, verify_entries, target, tokens):
        """Log-probs of the tokens this step emits, for the requests that asked (logprobs.py)."""
        n = max(e.request.params.logprobs for e in plan.entries if wants_logprobs(e))
        parts = []
        rows = [(j, i) for j, i in enumerate(sample_rows) if wants_logprobs(plan.entries[i])]
        if rows:
            idx = to_device([sample_logit_rows[j] for j, _ in rows], logits.device)
            parts.append(step_logprobs([i for _, i in rows], logits[idx].unsqueeze(1),
                                       sampled[to_device([j for j, _ in rows], logits.device)].unsqueeze(1), n))
        rows = [(j, i) for j, (i, _) in enumerate(verify_entries) if wants_logprobs(plan.entries[i])]
        if rows:
            idx = to_device([j for j, _ in rows], logits.device)
            parts.append(step_logprobs([i for _, i in rows], target[idx], tokens[idx], n))
        return parts

    def _verify(self, plan, logits, verify_entries, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [Nv, k+1] as rejection_sample returns them, the target logits [Nv, k+1, V] they were judged by)"""
        entries = [plan.entries[i] for i, _ in verify_entries]
        k = max(e.num_tokens - 1 for e in entries)
        n, vocab, dev = len(entries), logits.shape[-1], logits.device
        num_drafts = [e.num_tokens - 1 for e in entries]
        # One gather for the target logits [Nv, k+1, V]: slots past a row's own j repeat its last row (never read:
        # verification stops at j).
        rows = [[row + min(i, d) for i in range(k + 1)] for (_, row), d in zip(verify_entries, num_drafts)]
        target = logits[to_device(rows, dev)]
        if input_ids is None:  # drafts known on the host, padded with 0: one copy
            drafts = to_device([list(e.draft_token_ids) + [0] * (k - d) for e, d in zip(entries, num_drafts)], dev)
        else:  # from the ids the step ran on: a chunk is [last, d1..dj] at the entry's offset (padding repeats dj)
            offsets = plan.token_offsets()
            idx = [[offsets[i] + 1 + min(s, max(d - 1, 0)) for s in range(k)] for (i, _), d in zip(verify_entries, num_drafts)]
            drafts = input_ids[to_device(idx, dev)]
        drafts = drafts.view(n, k)
        draft_probs = None
        if not all(e.request.params.greedy for e in entries):
            draft_probs = torch.zeros(n, k, vocab, dtype=torch.float32, device=dev)
            rows, dst_entry, dst_pos = [], [], []  # one stack and one scatter for the step, not one per request
            for j, e in enumerate(entries):
                probs = self.draft_probs.pop(e.request.request_id, [])
                # sampled rows; greedy rows keep q = 0, i.e. accepted iff d == argmax p (exact)
                rows += probs
                dst_entry += [j] * len(probs)
                dst_pos += range(len(probs))
            if rows:
                draft_probs[to_device(dst_entry, dev), to_device(dst_pos, dev)] = torch.stack(rows)
        reqs = [e.request for e in entries]
        _, tokens = rejection_sample(
            drafts, draft_probs, target, _params(reqs), _position_seeds(entries),
            num_drafts=to_device(num_drafts, dev),
        )
        return tokens, target
