"""A step's metadata packed in ONE int64 buffer at a StepShape: one host->device copy per step, every step.

This is the one step-metadata builder. The graph runner (cuda_graphs.py) copies :func:`pack_step`'s host buffer into
a static device buffer and replays a graph whose first kernels are :func:`unpack_step`'s slices and casts — so
every layer's ForwardContext tensors have fixed addresses, and a step costs one H2D copy instead of one per metadata
tensor (13). The eager path (prefill steps, or no graphs) packs at the step's ``exact_shape`` and unpacks the same
way; step_forward.py builds the ForwardContext from the unpacked tensors for both.

Padding is inert by construction:

* padding tokens sit past ``query_start_loc[R_real]``: no request owns them, the attention kernel skips them,
  ``slot_mapping = -1`` keeps their K/V out of the cache, and their logits are never read;
* padding requests have zero query tokens and ``seq_len = 0``: every kernel program of theirs exits at once;
* padding score rows have budget 0 and write their (empty) pillar selection to a scratch row of the PillarStore
  (``scratch_slot``) that no request owns.

Layout (int64, in this order): input_ids[T], positions[T], slot_mapping[T], logits_indices[L] (L = T for graphed
steps), query_start_loc[R+1], seq_lens[R], draft_start[R], pillar_slot[R], is_sparse[R], block_tables[R*W],
score_rows[Rv], score_slots[Rv], budget[Rv].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsespec_compile.config import SparseSpecConfig

from .step_plan import Refresh, StepPlan
from .step_shapes import StepShape


def packed_fields(buf, shape: StepShape) -> dict:
    """Named views of a packed buffer (a numpy array on the host or a tensor on the device), in layout order."""
    T, R, Rv, W = shape.tokens, shape.requests, shape.scored, shape.table_width
    sizes = (("input_ids", T), ("positions", T), ("slot_mapping", T), ("logits_indices", shape.num_logits),
             ("query_start_loc", R + 1), ("seq_lens", R), ("draft_start", R), ("pillar_slot", R), ("is_sparse", R),
             ("block_tables", R * W), ("score_rows", Rv), ("score_slots", Rv), ("budget", Rv))
    fields, o = {}, 0
    for name, n in sizes:
        fields[name] = buf[o:o + n]
        o += n
    fields["block_tables"] = fields["block_tables"].reshape(R, W)
    return fields


class BlockTableMirror:
    """numpy copies of the running requests' block tables, extended by what grew since the last step.

    Converting every request's Python list every step was the largest host cost of a step (batch 64 at ~8k
    tokens: 64 lists of ~500 pages, ~0.6 ms per step of pack_step on a 2-core CI machine). Block tables only grow
    while a request runs; a freed or swapped request gets a new list object, which is re-copied whole.
    """

    def __init__(self) -> None:
        self._rows: dict[int, tuple[list[int], np.ndarray, int]] = {}  # request id -> (list, buffer, synced len)

    def get(self, request) -> np.ndarray:
        bt = request.block_table
        ent = self._rows.get(request.request_id)
        if ent is None or ent[0] is not bt or len(bt) < ent[2]:
            buf = np.empty(max(16, 2 * len(bt)), dtype=np.int64)
            synced = 0
        else:
            _, buf, synced = ent
        n = len(bt)
        if n > synced:
            if n > buf.shape[0]:
                grown = np.empty(2 * n, dtype=np.int64)
                grown[:synced] = buf[:synced]
                buf = grown
            buf[synced:n] = bt[synced:n]
        self._rows[request.request_id] = (bt, buf, n)
        return buf[:n]

    def forget_all_but(self, request_ids: set[int]) -> None:
        for rid in [rid for rid in self._rows if rid not in request_ids]:
            del self._rows[rid]


def pack_step(plan: StepPlan, shape: StepShape, config: SparseSpecConfig, page_size: int, scratch_slot: int,
              out: np.ndarray | None = None, tables: BlockTableMirror | None = None) -> np.ndarray:
    buf = np.zeros(shape.packed_size, dtype=np.int64) if out is None else out
    f = packed_fields(buf, shape)
    ids, pos, slots, logits, qsl = f["input_ids"], f["positions"], f["slot_mapping"], f["logits_indices"], \
        f["query_start_loc"]
    seq_lens, draft_start, pillar_slot, is_sparse = f["seq_lens"], f["draft_start"], f["pillar_slot"], f["is_sparse"]
    table_rows, score_rows, score_slots, budget = f["block_tables"], f["score_rows"], f["score_slots"], f["budget"]
    R, Rv, W = shape.requests, shape.scored, shape.table_width
    if out is not None:
        buf[:] = 0
    slots[:] = -1
    pillar_slot[:] = scratch_slot
    score_slots[:] = scratch_slot
    t = n_scored = n_logits = 0
    for i, e in enumerate(plan.entries):
        r = e.request
        n = e.num_tokens
        bt = tables.get(r) if tables is not None else np.asarray(r.block_table, dtype=np.int64)
        if n == 1:  # drafts and plain decodes: scalar writes (most entries of a decode step)
            p = e.start_pos
            ids[t] = e.token_ids[0]
            pos[t] = p
            slots[t] = bt[p // page_size] * page_size + p % page_size
        else:
            ids[t:t + n] = e.token_ids
            p = np.arange(e.start_pos, e.start_pos + n)
            pos[t:t + n] = p
            slots[t:t + n] = bt[p // page_size] * page_size + p % page_size
        k = e.num_logits
        if k == 1:
            logits[n_logits] = t + n - 1
        elif k:
            logits[n_logits:n_logits + k] = np.arange(t + n - k, t + n)
        n_logits += k
        t += n
        qsl[i + 1] = t
        seq_lens[i] = e.seq_len
        draft_start[i] = e.draft_start
        pillar_slot[i] = r.pillar_slot
        is_sparse[i] = e.sparse
        w = min(len(bt), W)  # pages past max_seq_len are never read
        table_rows[i, :w] = bt[:w]
        if Rv and e.refresh is Refresh.SCORE:
            score_rows[n_scored] = i
            score_slots[n_scored] = r.pillar_slot
            budget[n_scored] = config.budget(e.start_pos)
            n_scored += 1
    qsl[len(plan.entries) + 1:] = t  # padding requests own no tokens
    # Padding score rows: budget 0 into the scratch row; scored from a padding request (no work) when there is one.
    score_rows[n_scored:] = R - 1
    return buf


@dataclass
class PaddedStepTensors:
    """Device views of one packed buffer, typed as the ForwardContext and the model call want them."""

    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    logits_indices: torch.Tensor  # [L] int64
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    draft_start: torch.Tensor
    pillar_slot: torch.Tensor
    is_sparse: torch.Tensor
    block_tables: torch.Tensor
    score_rows: torch.Tensor | None
    score_slots: torch.Tensor | None
    budget: torch.Tensor | None


def unpack_step(packed: torch.Tensor, shape: StepShape) -> PaddedStepTensors:
    """Slices and casts of ``packed`` (run inside the graph capture, so they replay as a few tiny kernels).
    Model inputs are cloned: views of one buffer would be aliased graph inputs to Dynamo."""
    f = packed_fields(packed, shape)
    T, Rv = shape.tokens, shape.scored
    i32 = torch.int32
    return PaddedStepTensors(
        input_ids=f["input_ids"].view(1, T).clone(),
        position_ids=f["positions"].view(1, T).clone(),
        logits_indices=f["logits_indices"].clone(),
        slot_mapping=f["slot_mapping"],
        query_start_loc=f["query_start_loc"].to(i32),
        seq_lens=f["seq_lens"].to(i32),
        draft_start=f["draft_start"].to(i32),
        pillar_slot=f["pillar_slot"],
        is_sparse=f["is_sparse"].to(torch.bool),
        block_tables=f["block_tables"].to(i32),
        score_rows=f["score_rows"] if Rv else None,
        score_slots=f["score_slots"] if Rv else None,
        budget=f["budget"].to(i32) if Rv else None,
    )
