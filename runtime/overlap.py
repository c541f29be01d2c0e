"""Host/device overlap (``SparseSpecConfig.overlap``): launch step i+1 before reading step i's results.

What makes it possible is delayed verification: a request whose step-i result decides its future (a verify, or
the prefill chunk that ends its prompt) sits out step i+1 (``Scheduler.hold``), so scheduling step i+1 needs no
value from step i except the drafts sampled in it — and those are only *inputs* of step i+1 (the next draft's
token, the last token of a verify chunk). They travel as placeholders: the scheduler records draft ``-2 - row``
(``row`` = the draft's row in step i's sampled-token tensor; -1 is the verify padding), and after step i+1's inputs
reach the device one ``index_put_`` copies the real tokens from step i's tensor. The host reads step i's results
while the device runs step i+1, then swaps the placeholders for the values and applies the held updates.

At stride 0 there is nothing to verify: a plain decode's sampled token is final, so it goes into the request's
output at once as a placeholder (``Scheduler.launch_decodes``) and is the input of its next step, like a draft; the
stop checks wait for the value (``Scheduler.confirm_decode``), so a request that stopped has had one more step
computed, whose token is dropped.

Here: the placeholders and their device patch (``placeholder_patch``, ``patch_from``, ``apply_patch``), and what a
launched step applies before its values exist (``apply_at_launch``). The engine keeps the one step in flight
(``Engine._inflight``); reading its results and applying the rest is step_resolve.py.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter

import numpy as np
import torch

from .host_copy import to_device
from .request import RequestState
from .step_plan import StepKind, StepPlan
from .step_results import StepResults

# enum members as globals for the per-entry loop (a read off the enum class costs ~0.18 us more on Python 3.11)
_FINISHED = RequestState.FINISHED
_PREFILL, _DRAFT, _VERIFY = StepKind.PREFILL, StepKind.DRAFT, StepKind.VERIFY


def placeholder(row: int) -> int:
    return -2 - row


def source_row(token: int) -> int:
    return -2 - token


def placeholder_patch(plan: StepPlan) -> tuple[np.ndarray, np.ndarray]:
    """(positions on the flattened [T] token axis that hold a placeholder, the sampled-tensor row each copies).
    One numpy pass over the step's tokens: the nested Python loop cost ~0.15 ms at B 256, k = 8."""
    ids = np.fromiter(chain.from_iterable(map(_TOKEN_IDS, plan.entries)), dtype=np.int64)
    dst = np.flatnonzero(ids < -1)
    return dst, -2 - ids[dst]


_TOKEN_IDS = attrgetter("token_ids")


def apply_patch(input_ids: torch.Tensor, patch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
    """``input_ids[dst] = sampled[src]`` on the device (``patch = (dst, src, sampled)``, index tensors on the device)."""
    if patch is None:
        return
    dst, src, sampled = patch
    input_ids.index_put_((dst,), sampled.index_select(0, src))


def patch_from(plan: StepPlan, inflight: StepResults | None, device: torch.device):
    """The patch ``apply_patch`` takes for ``plan``'s placeholders: their positions and rows, on the device, and the
    tokens the step in flight sampled; None when ``plan`` has no placeholder."""
    dst, src = placeholder_patch(plan)
    if not dst.size:
        return None
    if inflight is None or inflight.sampled is None:
        raise RuntimeError(f"step {plan.step} has placeholder inputs but no step in flight to take them from")
    index = to_device(torch.from_numpy(np.stack((dst, src))), device)  # one copy for both: [2, n]
    return index[0], index[1], inflight.sampled


def apply_at_launch(scheduler, res: StepResults) -> None:
    """What ``scheduler`` can apply of a just-launched step before its values exist: drafts go in as placeholders;
    a plain decode runs on with a placeholder token; a verify or a prompt-ending prefill is held (sits out) until its
    result is read. Records on ``res`` what its resolution completes (``held``, ``placeholders``, ``decodes``)."""
    row_of = {i: j for j, i in enumerate(res.sample_rows)}
    sits_out = scheduler.planner.sits_out_after_verify
    now, decodes, res.held, res.placeholders = [], [], [], []
    held, placeholders = res.held, res.placeholders
    for i, e in enumerate(res.plan.entries):
        r = e.request
        if r.state is _FINISHED:
            continue
        kind = e.kind
        if kind is _DRAFT:
            row = row_of[i]
            now.append((e, [placeholder(row)]))
            placeholders.append((r, len(r.draft_token_ids), row))
        elif kind is _PREFILL and not e.num_logits:
            now.append((e, []))
        elif kind is _VERIFY and not sits_out(e.num_tokens - 1):
            # a plain decode (stride 0, or an adaptive k = 0): runs on, its token pending
            row = row_of[i]
            res.decodes.append((r, len(r.output_token_ids), row))
            decodes.append((e, placeholder(row)))
        else:
            scheduler.hold(r)
            held.append(i)
    if now:
        scheduler.update(StepPlan(res.plan.step, entries=[e for e, _ in now]), [t for _, t in now])
    scheduler.launch_decodes(decodes)  # after the drafts: their next cycles see every phase as it is
