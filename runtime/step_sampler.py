"""Sampling and verification of one step's logits: which rows sample a token, which verify drafts, and what a
sampled draft keeps for its verification (its logits row and stats, verify.Drafts). Everything is launched on the
device and nothing is read back here (StepResults.lists() does, later).

Host cost: one pass over the plan's entries (``_Rows``), the step's index arrays made with numpy and sent in one
host->device copy. A greedy step (every row temperature 0, LLM.generate's default) takes ``_greedy``: one argmax over
every logits row, one gather for the sampled tokens and the verify slots, and verify.greedy_accept, their
results in one buffer read back with one copy."""

from __future__ import annotations

import numpy as np
import torch

from .host_copy import to_device
from .logprobs import step_logprobs, wants_logprobs
from .request import Request
from .step_plan import StepEntry, StepKind, StepPlan
from .step_results import StepResults
from . import verify as verify_module
from .verify import Drafts, PositionSeed, rejection_sample, sample

_VERIFY, _DRAFT = StepKind.VERIFY, StepKind.DRAFT


def _params(reqs: list[Request]):
    """One SamplingParams when every request samples the same way (LLM.generate's usual case: built on the device
    with torch.full and cached, no host list -> device copy), else one per row. Requests with their own but equal
    (temperature, top_k, top_p) count as the same: those are all SamplingTensors reads (seeds go apart)."""
    first = reqs[0].params
    key = (first.temperature, first.top_k, first.top_p)
    for r in reqs:
        p = r.params
        if p is not first and (p.temperature, p.top_k, p.top_p) != key:
            return [r.params for r in reqs]
    return first


def _position_seeds(entries: list[StepEntry]) -> list[PositionSeed | None] | None:
    """Noise of seeded requests keyed by the output position each row samples (verify.PositionSeed): a draft
    predicts position len(output) + drafts so far; a verify chunk's slot s, len(output) + s; a prompt's end or a
    plain decode, len(output). None when no request is seeded (noise seeds drawn on the device)."""
    if all(e.request.params.seed is None for e in entries):
        return None
    return [None if e.request.params.seed is None else PositionSeed(
        e.request.params.seed,
        len(e.request.output_token_ids) + (len(e.request.draft_token_ids) if e.kind is _DRAFT else 0))
        for e in entries]


class _Rows:
    """One pass over a plan's entries (0.27 ms at B 256 on this CPU, the sampler's largest host cost): which sample a
    token (``sample_entries`` and their logits rows), which verify drafts (entry, first logits row, drafts, token
    offset), whether every row is greedy and whether one wants log-probs (logprobs.wants_logprobs)."""

    def __init__(self, plan: StepPlan) -> None:
        self.sample_entries, self.sample_rows = [], []
        self.verify_entries, self.verify_rows, self.verify_drafts, self.verify_offsets = [], [], [], []
        greedy, logprobs = True, False
        rows = off = 0
        for i, e in enumerate(plan.entries):
            n, t, kind = e.num_logits, len(e.token_ids), e.kind
            # A verify of no drafts (every plain decode at stride 0) is a plain sample from the target: one sampled
            # row, which overlap can hand to the next step as a placeholder like a draft's.
            if n and (kind is not _VERIFY or t == 1):
                self.sample_entries.append(i)
                self.sample_rows.append(rows)
            elif kind is _VERIFY:
                self.verify_entries.append(i)
                self.verify_rows.append(rows)
                self.verify_drafts.append(t - 1)
                self.verify_offsets.append(off)
            else:  # a prompt chunk that samples nothing
                off += t
                continue
            p = e.request.params
            greedy = greedy and p.temperature == 0.0
            logprobs = logprobs or (n and p.logprobs is not None and kind is not _DRAFT)
            rows += n
            off += t
        self.greedy, self.logprobs, self.num_rows = greedy, bool(logprobs), rows
        self.k = max(self.verify_drafts, default=0)

    def sample_rows_are_all(self) -> bool:
        """Every logits row is a sampled one, in order (a plain decode step: no index to send or gather by)."""
        return not self.verify_entries and len(self.sample_rows) == self.num_rows


def _verify_index(r: _Rows) -> tuple[np.ndarray, np.ndarray]:
    """target_index [Nv, k+1] (slot s's logits row; slots past a row's own j repeat its last row, never read:
    verification stops at j) and the drafts' positions on the token axis [Nv, k] (a chunk is [last, d1..dj] at the
    entry's offset; padding repeats dj)."""
    nd = np.asarray(r.verify_drafts, dtype=np.int64)[:, None]
    slots = np.arange(r.k + 1, dtype=np.int64)
    target = np.asarray(r.verify_rows, dtype=np.int64)[:, None] + np.minimum(slots, nd)
    drafts = np.asarray(r.verify_offsets, dtype=np.int64)[:, None] + 1 + np.minimum(slots[:-1],
                                                                                   np.maximum(nd - 1, 0))
    return target, drafts


def _host_drafts(plan: StepPlan, r: _Rows) -> np.ndarray:
    """The drafts as the host knows them [Nv, k], padded with 0 (no ``input_ids`` to gather them from)."""
    out = np.zeros((len(r.verify_entries), r.k), dtype=np.int64)
    for j, i in enumerate(r.verify_entries):
        d = plan.entries[i].draft_token_ids
        out[j, :len(d)] = d
    return out


def _kept_drafts(plan: StepPlan, r: _Rows) -> list[int]:
    """Sampled rows (positions in ``r.sample_entries``) whose logits row and stats are kept for verification: drafts
    verified by rejection sampling. Seeded requests verify by coupling (verify.py), which reads only the drafted
    tokens; greedy ones by matching."""
    keep = []
    for j, i in enumerate(r.sample_entries):
        e = plan.entries[i]
        if e.kind is _DRAFT and not e.request.params.greedy and e.request.params.seed is None:
            keep.append(j)
    return keep


class _Upload:
    """Int64 host arrays packed into one buffer and sent in one host->device copy; ``get(name)`` is its device view
    (each to_device is a pinned staging copy and a launch on the GPU: a greedy step made 5 of them)."""

    def __init__(self, device) -> None:
        self.device, self._parts, self._at, self._size, self._dev = device, [], {}, 0, None

    def add(self, name: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=np.int64)
        self._parts.append(a.reshape(-1))
        self._at[name] = (self._size, a.shape, a)
        self._size += a.size

    def send(self) -> None:
        if self._parts:
            self._dev = to_device(torch.from_numpy(np.concatenate(self._parts)), self.device)

    def get(self, name: str) -> torch.Tensor:
        start, shape, a = self._at[name]
        return self._dev[start:start + a.size].view(shape)

    def span(self, first: str, last: str) -> torch.Tensor:
        """The flat device view from ``first``'s start to ``last``'s end (added in that order)."""
        start, end = self._at[first][0], self._at[last][0] + self._at[last][2].size
        return self._dev[start:end]


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
        r = _Rows(plan)
        up = _Upload(logits.device)
        if r.sample_entries and not (r.greedy and r.sample_rows_are_all()):
            up.add("sample", np.asarray(r.sample_rows, dtype=np.int64))
        if r.verify_entries:  # (right after "sample": the greedy gather reads both as one span)
            target, drafts = _verify_index(r)
            up.add("target", target)
            up.add("drafts", drafts if input_ids is not None else _host_drafts(plan, r))
            up.add("num_drafts", np.asarray(r.verify_drafts, dtype=np.int64)[:, None])
        keep = [] if r.greedy else _kept_drafts(plan, r)
        if keep:
            up.add("keep", np.asarray(keep, dtype=np.int64))
        up.send()
        if r.greedy:
            res = self._greedy(plan, logits, r, up, input_ids)
        else:
            res = self._sampled(plan, logits, r, up, input_ids, keep)
        if r.logprobs:
            res.logprobs = self._logprobs(plan, logits, r, up, res.sampled, res.verify_tokens)
        return res

    def _greedy(self, plan, logits, r: _Rows, up: _Upload, input_ids) -> StepResults:
        """Every row greedy: one argmax over all rows, one gather of the sampled rows' and the verify slots' tokens
        into one buffer, the acceptance by verify.greedy_accept with its masked tokens copied back into that buffer,
        so ``sampled`` and ``verify_tokens`` are views of one tensor, read back with one copy."""
        ns, nv = len(r.sample_entries), len(r.verify_entries)
        if not ns and not nv:  # only prompt chunks that sample nothing
            return StepResults(plan, [], None, [], None, input_ids)
        tokens = logits.argmax(-1)
        if not r.sample_rows_are_all():
            tokens = tokens[up.span("sample" if ns else "target", "target" if nv else "sample")]
        sampled = tokens[:ns] if ns else None
        verify = None
        if nv:
            k = r.k
            verify = tokens[ns:].view(nv, k + 1)  # the target's token after each verify input
            drafts = up.get("drafts") if input_ids is None else input_ids[up.get("drafts")]
            # the one greedy acceptance rule (verify.greedy_accept, looked up at call time: `sparsespec check`'s
            # planted faults replace it there); its masked tokens back into the gathered buffer, read with one copy
            verify.copy_(verify_module.greedy_accept(drafts, verify, up.get("num_drafts").view(-1))[1])
        return StepResults(plan, r.sample_entries, sampled, r.verify_entries, verify, input_ids,
                           packed=tokens if ns and nv else None)

    def _sampled(self, plan, logits, r: _Rows, up: _Upload, input_ids, keep: list[int]) -> StepResults:
        sampled = verify_tokens = None
        if r.sample_entries:
            sampled = self._sample(plan, logits, r, up, keep)
        if r.verify_entries:
            verify_tokens = self._verify(plan, logits, r, up, input_ids)
        return StepResults(plan, r.sample_entries, sampled, r.verify_entries, verify_tokens, input_ids)

    def _sample(self, plan, logits, r: _Rows, up: _Upload, keep: list[int]) -> torch.Tensor:
        entries = [plan.entries[i] for i in r.sample_entries]
        # the kernel reads the rows in place: no [N, V] gather (need_stats left None: the kernel ignores it)
        tokens, stats = sample(logits, _params([e.request for e in entries]), _position_seeds(entries),
                               rows=up.get("sample"))
        if keep:  # a sampled draft's logits row outlives this step's buffer: one gather of those rows
            sel = up.get("keep")
            kept_logits, kept_stats = logits[up.get("sample")[sel]].unbind(0), stats[sel].unbind(0)
            for j, lrow, srow in zip(keep, kept_logits, kept_stats):
                self._drafts.setdefault(entries[j].request.request_id, []).append((lrow, srow))
        return tokens

    def _verify(self, plan, logits, r: _Rows, up: _Upload, input_ids) -> torch.Tensor:
        """tokens [Nv, k+1] as rejection_sample returns them."""
        entries = [plan.entries[i] for i in r.verify_entries]
        n, k, dev = len(entries), r.k, logits.device
        drafts = up.get("drafts") if input_ids is None else input_ids[up.get("drafts")]
        kept = None
        if not all(e.request.params.greedy for e in entries):
            lrows, srows, index = [], [], np.full((n, k), -1, dtype=np.int64)  # one stack for the step
            for j, e in enumerate(entries):
                # (greedy and seeded requests keep none: their drafts are matched against the target's own token)
                mine = self._drafts.pop(e.request.request_id, [])
                m = min(len(mine), k)
                index[j, :m] = np.arange(len(lrows), len(lrows) + m)
                lrows += [x for x, _ in mine]
                srows += [s for _, s in mine]
            if lrows:
                kept = Drafts(torch.stack(lrows), torch.stack(srows), to_device(torch.from_numpy(index), dev))
            else:  # only seeded (coupled) or draft-less sampled rows: no draft row is read
                kept = Drafts(logits[:1], torch.ones(1, 5, device=dev), torch.full((n, k), -1, device=dev))
        _, tokens = rejection_sample(drafts, kept, logits, _params([e.request for e in entries]),
                                     _position_seeds(entries), num_drafts=up.get("num_drafts").view(-1),
                                     target_index=up.get("target"))
        return tokens

    def _logprobs(self, plan, logits, r: _Rows, up: _Upload, sampled, tokens):
        """Log-probs of the tokens this step emits, for the requests that asked (logprobs.py)."""
        n = max(e.request.params.logprobs for e in plan.entries if wants_logprobs(e))
        parts = []
        rows = [(j, i) for j, i in enumerate(r.sample_entries) if wants_logprobs(plan.entries[i])]
        if rows:
            idx = to_device([r.sample_rows[j] for j, _ in rows], logits.device)
            parts.append(step_logprobs([i for _, i in rows], logits[idx].unsqueeze(1),
                                       sampled[to_device([j for j, _ in rows], logits.device)].unsqueeze(1), n))
        rows = [(j, i) for j, i in enumerate(r.verify_entries) if wants_logprobs(plan.entries[i])]
        if rows:
            idx = to_device([j for j, _ in rows], logits.device)
            parts.append(step_logprobs([i for _, i in rows], logits[up.get("target")[idx]], tokens[idx], n))
        return parts
