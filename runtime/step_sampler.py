"""Sampling and verification of one step's logits: which rows sample a token, which verify drafts, and what a
sampled draft keeps for its verification (its logits row and stats, verify.Drafts). Everything is launched on the
device and nothing is read back here (StepResults.lists() does, later)."""

from __future__ import annotations

import torch

from .host_copy import to_device
from .logprobs import step_logprobs, wants_logprobs
from .request import Request
from .step_plan import StepEntry, StepKind, StepPlan
from .step_results import StepResults
from .verify import Drafts, PositionSeed, rejection_sample, sample


def _params(reqs: list[Request]):
    """One SamplingParams when every request shares it (LLM.generate's usual case: built on the device with
    torch.full, no host list -> device copy), else one per row."""
    first = reqs[0].params
    return first if all(r.params is first for r in reqs) else [r.params for r in reqs]


def _position_seeds(entries: list[StepEntry]) -> list[PositionSeed | None] | None:
    """Noise of seeded requests keyed by the output position each row samples (verify.PositionSeed): a draft
    predicts position len(output) + drafts so far; a verify chunk's slot s, len(output) + s; a prompt's end or a
    plain decode, len(output). None when no request is seeded (noise seeds drawn on the device)."""
    seeds = [None if e.request.params.seed is None else PositionSeed(
        e.request.params.seed,
        len(e.request.output_token_ids) + (len(e.request.draft_token_ids) if e.kind is StepKind.DRAFT else 0))
        for e in entries]
    return seeds if any(s is not None for s in seeds) else None


class StepSampler:
    def __init__(self) -> None:
        # request id -> this cycle's sampled drafts: (logits row [V] as the model produced it, stats [5])
        self._drafts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def forget(self, requests: list[Request]) -> None:
        """Drop the kept drafts of requests that finished or restart their cycle (preempted)."""
        for r in requests:
            self._drafts.pop(r.request_id, None)

    def run(self, plan: StepPlan, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> StepResults:
        """Launch sampling and verification for the plan's logits [N, V]. ``input_ids``: the [T] ids the step ran on
        (device); when given, verify drafts are gathered from it (their values may be device-side placeholders the
        host does not know yet) and kept in the results."""
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
        sampled = verify_tokens = target_index = None
        if sample_rows:
            sampled = self._sample(plan, logits, sample_rows, sample_logit_rows)
        if verify_entries:
            verify_tokens, target_index = self._verify(plan, logits, verify_entries, input_ids)
        res = StepResults(plan, sample_rows, sampled, [i for i, _ in verify_entries], verify_tokens, input_ids)
        if any(wants_logprobs(e) for e in plan.entries):
            res.logprobs = self._logprobs(plan, logits, sample_rows, sample_logit_rows, sampled, verify_entries,
                                          target_index, verify_tokens)
        return res

    def _sample(self, plan, logits, sample_rows, sample_logit_rows) -> torch.Tensor:
        entries = [plan.entries[i] for i in sample_rows]
        idx = to_device(sample_logit_rows, logits.device)
        # Drafts verified by rejection sampling keep their row for it; seeded requests verify by coupling (verify.py),
        # which reads only the drafted tokens. The other rows' kept sets are never read (need_stats: a hint).
        keep = [j for j, e in enumerate(entries)
                if e.kind is StepKind.DRAFT and not e.request.params.greedy and e.request.params.seed is None]
        mine = set(keep)
        need = None if len(keep) == len(entries) else to_device([j in mine for j in range(len(entries))],
                                                                  logits.device, torch.bool)
        # the kernel reads the rows in place: no [N, V] gather
        tokens, stats = sample(logits, _params([e.request for e in entries]), _position_seeds(entries), rows=idx,
                               need_stats=need)
        if keep:  # a sampled draft's logits row outlives this step's buffer: one gather of those rows
            sel = to_device(keep, logits.device)
            kept_logits, kept_stats = logits[idx[sel]].unbind(0), stats[sel].unbind(0)
            for j, lrow, srow in zip(keep, kept_logits, kept_stats):
                self._drafts.setdefault(entries[j].request.request_id, []).append((lrow, srow))
        return tokens

    def _verify(self, plan, logits, verify_entries, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [Nv, k+1] as rejection_sample returns them, the target rows [Nv, k+1] of ``logits`` they were
        judged by)"""
        entries = [plan.entries[i] for i, _ in verify_entries]
        k = max(e.num_tokens - 1 for e in entries)
        n, dev = len(entries), logits.device
        num_drafts = [e.num_tokens - 1 for e in entries]
        # slots past a row's own j repeat its last row (never read: verification stops at j)
        target_index = to_device([[row + min(i, d) for i in range(k + 1)]
                                  for (_, row), d in zip(verify_entries, num_drafts)], dev)
        if input_ids is None:  # drafts known on the host, padded with 0: one copy
            drafts = to_device([list(e.draft_token_ids) + [0] * (k - d) for e, d in zip(entries, num_drafts)], dev)
        else:  # from the ids the step ran on: a chunk is [last, d1..dj] at the entry's offset (padding repeats dj)
            offsets = plan.token_offsets()
            idx = [[offsets[i] + 1 + min(s, max(d - 1, 0)) for s in range(k)]
                   for (i, _), d in zip(verify_entries, num_drafts)]
            drafts = input_ids[to_device(idx, dev)]
        drafts = drafts.view(n, k)
        kept = None
        if not all(e.request.params.greedy for e in entries):
            lrows, srows, index = [], [], []  # one stack for the step, not one per request
            for e in entries:
                # (greedy and seeded requests keep none: their drafts are matched against the target's own token)
                mine = self._drafts.pop(e.request.request_id, [])
                index.append([len(lrows) + s if s < len(mine) else -1 for s in range(k)])
                lrows += [x for x, _ in mine]
                srows += [s for _, s in mine]
            if lrows:
                kept = Drafts(torch.stack(lrows), torch.stack(srows), to_device(index, dev))
            else:  # only seeded (coupled) or draft-less sampled rows: no draft row is read
                kept = Drafts(logits[:1], torch.ones(1, 5, device=dev), torch.full((n, k), -1, device=dev))
        _, tokens = rejection_sample(drafts, kept, logits, _params([e.request for e in entries]),
                                     _position_seeds(entries), num_drafts=to_device(num_drafts, dev),
                                     target_index=target_index)
        return tokens, target_index

    def _logprobs(self, plan, logits, sample_rows, sample_logit_rows, sampled, verify_entries, target_index, tokens):
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
            parts.append(step_logprobs([i for _, i in rows], logits[target_index[idx]], tokens[idx], n))
        return parts
