"""Log-probabilities of the returned tokens (``SamplingParams(logprobs=n)``): for each emitted token, its log-prob and
the ``n`` most likely alternatives', under the model's raw distribution (log-softmax of the logits, before
temperature / top-k / top-p: vLLM's default). A token emitted by a verify step gets the target's distribution at its
position, the same one plain decoding would have sampled it from, never the draft's.

Computed on the device with the step's sampling and read on the host with its results (one extra copy, only in steps
where some request asked for them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .step_plan import StepEntry, StepKind


@dataclass
class StepLogprobs:
    entries: list[int]  # plan entry of each row
    chosen: torch.Tensor  # [R, S] log p of the emitted token in each slot (slots past a row's result: unused)
    tokens: torch.Tensor  # [R, S] the emitted tokens (-1 past the result)
    top_ids: torch.Tensor  # [R, S, n]
    top: torch.Tensor  # [R, S, n]

    def per_entry(self) -> dict[int, list[dict[int, float]]]:
        """Entry index -> one ``{token id: log-prob}`` per slot: the emitted token first, then the top ``n``."""
        out = {}
        rows = zip(self.entries, self.chosen.tolist(), self.tokens.tolist(), self.top_ids.tolist(), self.top.tolist())
        for i, chosen, tokens, top_ids, top in rows:
            out[i] = [{t: c, **dict(zip(ids, lps))} for c, t, ids, lps in zip(chosen, tokens, top_ids, top) if t >= 0]
        return out


def wants_logprobs(e: StepEntry) -> bool:
    """Entries that emit output tokens (not drafts) of requests that asked for log-probs."""
    return e.request.params.logprobs is not None and e.kind is not StepKind.DRAFT and e.num_logits > 0


def step_logprobs(entries: list[int], logits: torch.Tensor, tokens: torch.Tensor, n: int) -> StepLogprobs:
    """logits [R, S, V] of the rows, tokens [R, S] emitted (-1 past a row's result) -> StepLogprobs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    top, top_ids = lp.topk(n, dim=-1) if n else (lp[..., :0], tokens.new_zeros(*tokens.shape, 0))
    return StepLogprobs(entries, chosen, tokens, top_ids, top)


__all__ = ["StepLogprobs", "step_logprobs", "wants_logprobs"]
