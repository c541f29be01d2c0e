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
from itertools import chain, repeat
from operator import attrgetter, is_, is_not

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
    """The running requests' block tables as rows of one numpy matrix, extended by what grew since the last step.

    Converting every request's Python list every step was the largest host cost of a step (batch 64 at ~8k
    tokens: 64 lists of ~500 pages, ~0.6 ms per step of pack_step on a 2-core CI machine). Block tables only grow
    while a request runs; a freed or swapped request gets a new list object, which is re-copied whole. One matrix
    (not an array per request) lets a step gather every table with one fancy index (256 row copies: ~0.4 ms), and
    which rows are stale is found with C-level maps over the batch (a Python loop over 231 requests: ~0.2 ms).
    Columns past a row's synced length are zero (what a packed table row holds there).
    """

    def __init__(self) -> None:
        self._row_of: dict[int, int] = {}  # request id -> matrix row
        self._lists: list[list[int] | None] = []  # matrix row -> the list it mirrors
        self._synced = np.zeros(16, dtype=np.int64)  # matrix row -> entries copied
        self._free: list[int] = []
        self._mat = np.zeros((16, 64), dtype=np.int64)
        self._sweeps = 0

    @property
    def matrix(self) -> np.ndarray:
        return self._mat

    def get(self, request) -> np.ndarray:
        """The request's block table (a view: valid until the next call)."""
        row = self.rows([request])[0]
        return self._mat[row, :len(request.block_table)]

    def rows(self, requests, tables: list | None = None, lens: np.ndarray | None = None) -> np.ndarray:
        """The matrix row of each request, synced with its block table (``tables``/``lens``: the requests'
        block tables and their lengths, when the caller has them)."""
        if tables is None:
            tables = list(map(_BLOCK_TABLE, requests))
        if lens is None:
            lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        found = list(map(self._row_of.get, map(_REQUEST_ID, requests)))
        if None in found:
            found = [self._new_row(r) if row is None else row for r, row in zip(requests, found)]
        rows = np.asarray(found, dtype=np.intp)
        stale = self._synced[rows] != lens
        if not all(map(is_, tables, map(self._lists.__getitem__, found))):
            stale |= np.fromiter(map(is_not, tables, map(self._lists.__getitem__, found)), dtype=bool,
                                 count=len(found))
        for i in np.flatnonzero(stale).tolist():
            self._sync(found[i], tables[i])
        return rows

    def _sync(self, row: int, bt: list[int]) -> None:
        n, synced = len(bt), int(self._synced[row])
        if self._lists[row] is not bt or n < synced:  # a new list (or a shrunk one): copied whole
            self._mat[row, :synced] = 0
            synced = 0
        if n > self._mat.shape[1]:
            self._grow(self._mat.shape[0], max(2 * n, 64))
        self._mat[row, synced:n] = bt[synced:n]
        self._lists[row], self._synced[row] = bt, n

    def _new_row(self, request) -> int:
        if self._free:
            row = self._free.pop()
        else:
            row = len(self._lists)
            self._lists.append(None)
            if row == self._mat.shape[0]:
                self._grow(2 * row, self._mat.shape[1])
        self._row_of[request.request_id] = row
        return row

    def _grow(self, rows: int, cols: int) -> None:
        mat = np.zeros((rows, cols), dtype=np.int64)
        r, c = self._mat.shape
        mat[:r, :c] = self._mat
        self._mat = mat
        if rows > self._synced.shape[0]:
            self._synced = np.concatenate([self._synced, np.zeros(rows - self._synced.shape[0], dtype=np.int64)])

    def sweep(self, plan: StepPlan, every: int = 256) -> None:
        """Once every ``every`` calls (one a step), drop the copies of requests that are not in ``plan``."""
        if self._sweeps % every == 0:
            self.forget_all_but({e.request.request_id for e in plan.entries})
        self._sweeps += 1

    def forget_all_but(self, request_ids: set[int]) -> None:
        for rid in [rid for rid in self._row_of if rid not in request_ids]:
            row = self._row_of.pop(rid)
            self._mat[row, :self._synced[row]] = 0
            self._synced[row], self._lists[row] = 0, None
            self._free.append(row)


_BLOCK_TABLE = attrgetter("block_table")
_REQUEST_ID = attrgetter("request_id")
_ENTRY_COLUMNS = attrgetter("token_ids", "start_pos", "num_logits", "draft_start", "sparse", "refresh", "request")
_PILLAR_SLOT = attrgetter("pillar_slot")


def pack_step(plan: StepPlan, shape: StepShape, config: SparseSpecConfig, page_size: int, scratch_slot: int,
              out: np.ndarray | None = None, tables: BlockTableMirror | None = None) -> np.ndarray:
    """``plan`` packed at ``shape`` (into ``out`` when given). Whole-step numpy over columns gathered in one pass
    over the entries: a per-entry loop cost ~1.0 ms against ~0.35 ms for this at B 256, k = 8 (231 entries, 439
    tokens; timeit minimum on a shared 2-core machine). ``tables``: the block-table mirror to read (without one
    every table is copied afresh: as slow as the loop)."""
    buf = np.zeros(shape.packed_size, dtype=np.int64) if out is None else out
    if out is not None:
        buf.fill(0)
    f = packed_fields(buf, shape)
    f["slot_mapping"].fill(-1)
    f["pillar_slot"].fill(scratch_slot)
    f["score_slots"].fill(scratch_slot)
    entries = plan.entries
    if not entries:
        f["score_rows"].fill(shape.requests - 1)
        return buf
    toks, start, n_logits, draft_start, sparse, refresh, reqs = zip(*map(_ENTRY_COLUMNS, entries))
    _pack_tokens(f, toks, start, n_logits, reqs, tables if tables is not None else BlockTableMirror(), page_size,
                 shape.table_width)
    E = len(entries)
    f["seq_lens"][:E] += f["query_start_loc"][1:E + 1] - f["query_start_loc"][:E]  # start_pos + num_tokens
    f["draft_start"][:E] = np.fromiter(draft_start, dtype=np.int64, count=E)
    f["is_sparse"][:E] = np.fromiter(sparse, dtype=bool, count=E)
    pillar = f["pillar_slot"]
    pillar[:E] = np.fromiter(map(_PILLAR_SLOT, reqs), dtype=np.int64, count=E)
    n_scored = 0
    if shape.scored:
        scored = np.flatnonzero(np.fromiter(map(is_, refresh, repeat(Refresh.SCORE)), dtype=bool, count=E))
        n_scored = len(scored)
        f["score_rows"][:n_scored] = scored
        f["score_slots"][:n_scored] = pillar[scored]
        f["budget"][:n_scored] = [config.budget(start[i]) for i in scored.tolist()]
    # Padding score rows: budget 0 into the scratch row; scored from a padding request (no work) when there is one.
    f["score_rows"][n_scored:] = shape.requests - 1
    return buf


def _pack_tokens(f: dict, toks, start, n_logits, reqs, tables: BlockTableMirror, page_size: int, W: int) -> None:
    """input_ids, positions, slot_mapping, logits_indices, query_start_loc, block_tables; seq_lens = start_pos."""
    E = len(toks)
    n = np.fromiter(map(len, toks), dtype=np.int64, count=E)
    ends = np.cumsum(n)
    T = int(ends[-1])
    f["input_ids"][:T] = np.fromiter(chain.from_iterable(toks), dtype=np.int64, count=T)
    starts = f["seq_lens"][:E]
    starts[:] = start
    owner = np.repeat(np.arange(E), n)  # the entry of each token
    pos = np.arange(T) - np.repeat(ends - n - starts, n)
    f["positions"][:T] = pos
    bts = list(map(_BLOCK_TABLE, reqs))
    lens = np.fromiter(map(len, bts), dtype=np.int64, count=E)
    rows = tables.rows(reqs, bts, lens)
    mat = tables.matrix
    page = pos // page_size
    if (page >= lens[owner]).any():
        raise IndexError("a token's position lies past its request's block table")
    f["slot_mapping"][:T] = mat[rows[owner], page] * page_size + pos % page_size
    w = min(W, mat.shape[1])  # pages past max_seq_len are never read
    f["block_tables"][:E, :w] = mat[rows, :w]
    k = np.asarray(n_logits, dtype=np.int64)
    L = int(k.sum())
    if L == E and (k == 1).all():  # one logit per entry (drafts, plain decodes): its last token
        f["logits_indices"][:E] = ends - 1
    elif L:
        f["logits_indices"][:L] = np.arange(L) + np.repeat(ends - k - (np.cumsum(k) - k), k)
    qsl = f["query_start_loc"]
    qsl[1:E + 1] = ends
    qsl[E + 1:] = T  # padding requests own no tokens


def packed_logits(plan: StepPlan) -> int:
    """Logit rows the plan reads (the first rows of a step's logits)."""
    return sum(map(_NUM_LOGITS, plan.entries))


_NUM_LOGITS = attrgetter("num_logits")


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
