"""What one step runs: the StepPlan the scheduler hands the engine (entries, finished, preempted, swaps).

Torch-free; ``scheduler.py`` builds these, ``padded_step.py`` packs them for the device, ``offload.py`` runs the swaps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .request import Request


class StepKind(enum.Enum):
    PREFILL = "prefill"
    DRAFT = "draft"
    VERIFY = "verify"


class Refresh(enum.Enum):
    """What a verify row does to its request's pillars (decided once, when the plan is made)."""

    NONE = "none"  # nothing: draft="full", a plain decode (k = 0) not followed by a probe, prefill, drafts
    SCORE = "score"  # PillarAttn: the attention op ranks the context by the verify queries' attention
    STREAMING = "streaming"  # sinks + newest window, written by the engine after the step (no scores)


_set = object.__setattr__


@dataclass(frozen=True, slots=True, init=False)
class StepEntry:
    """One request's query tokens in a step: ``token_ids[i]`` sits at position ``start_pos + i``.

    * PREFILL: a chunk of ``prompt`` (or of ``prompt + output[:-1]`` after a preemption); ``num_logits`` is 1 on
      the chunk that completes a fresh prompt (sample the first output token from its last position), else 0.
    * DRAFT: ``[t]`` where ``t`` is the last sampled token (first draft of the cycle) or the previous draft;
      ``num_logits == 1``; the engine samples the next draft. ``sparse`` = attend with pillars + dense tail
      (False: full attention — draft="full", or no pillars yet).
    * VERIFY: ``[last, d1..dj]`` at ``start_pos .. start_pos + j`` (``start_pos == num_computed_tokens``), full
      attention, ``num_logits == j + 1``: logits at ``start_pos + i`` judge ``d_{i+1}`` and the last one gives the
      bonus token; ``j == 0`` is a plain decode. ``refresh``: what the row does to the request's pillars.

    ``sparse`` and ``refresh`` are the row's whole mode: the input builders, the graphs and the engine read them and
    never re-derive them from the config (scheduler.py ``_decode_entry`` decides them).
    """

    request: Request
    kind: StepKind
    token_ids: tuple[int, ...]
    start_pos: int
    num_logits: int
    sparse: bool = False
    refresh: Refresh = Refresh.NONE
    draft_start: int = 0  # positions >= this are the dense tail of a sparse draft
    # Derived once here: read ~2,500 times a step at B 256, k = 8 (a property cost 0.1 us a read, an attribute 0.04)
    num_tokens: int = field(init=False, repr=False, compare=False)
    seq_len: int = field(init=False, repr=False, compare=False)  # context incl. this step's tokens (seq_lens)

    def __init__(self, request: Request, kind: StepKind, token_ids: tuple[int, ...], start_pos: int,
                 num_logits: int, sparse: bool = False, refresh: Refresh = Refresh.NONE, draft_start: int = 0) -> None:
        # by hand, one object.__setattr__ bound once: the generated frozen __init__ took 3.5 us an entry, this 2.0
        # (one entry per request per step)
        _set(self, "request", request)
        _set(self, "kind", kind)
        _set(self, "token_ids", token_ids)
        _set(self, "start_pos", start_pos)
        _set(self, "num_logits", num_logits)
        _set(self, "sparse", sparse)
        _set(self, "refresh", refresh)
        _set(self, "draft_start", draft_start)
        n = len(token_ids)
        _set(self, "num_tokens", n)
        _set(self, "seq_len", start_pos + n)

    @property
    def positions(self) -> range:
        return range(self.start_pos, self.seq_len)

    @property
    def draft_token_ids(self) -> tuple[int, ...]:
        """VERIFY only: the drafts being judged (``token_ids[1:]``)."""
        return self.token_ids[1:]


@dataclass(frozen=True)
class SwapOp:
    """Copy one request's KV between the pools: ``device_blocks[i] <-> host_blocks[i]`` (block-table order, every
    layer, K and V), and its PillarStore row ``pillar_slot <-> host_row`` (indices and length)."""

    request: Request
    device_blocks: tuple[int, ...]
    host_blocks: tuple[int, ...]
    pillar_slot: int
    host_row: int


@dataclass(frozen=True)
class StepPlan:
    """What one step runs. The engine executes ``swap_in`` and then ``swap_out`` before the forward: in that order,
    since a host page (or host row) freed by a swap-in may be handed to a swap-out of the same plan, while a device
    page freed by a swap-out is never one a swap-in of the same plan writes (swap-ins are planned first).

    The scheduler appends to ``entries`` while it builds the plan and then calls :meth:`seal`: ``entries`` becomes a
    tuple (an append or an item assignment raises; the dataclass is frozen, so no field is rebound either) and the
    per-step aggregates are computed once from it. Reading an aggregate before ``seal`` raises, so a cached
    aggregate never describes other entries than the plan's. (One pass over the entries costs ~80 us at B 256 on a
    loaded 2-core CPU: done once, not per read.) A plan built only to hand results to ``Scheduler.update`` (the
    engine's, at launch and at resolve) is never sealed: nothing reads its aggregates."""

    step: int
    entries: list[StepEntry] | tuple[StepEntry, ...] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # FINISHED since the previous plan (incl. rejected)
    preempted: list[Request] = field(default_factory=list)  # lost their KV this step (back to waiting)
    swap_out: list[SwapOp] = field(default_factory=list)  # device -> host, then the device pages are reused
    swap_in: list[SwapOp] = field(default_factory=list)  # host -> device, into freshly allocated pages
    # set by seal(): None until then
    _offsets: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)
    _num_tokens: int = field(default=0, init=False, repr=False, compare=False)

    def seal(self) -> StepPlan:
        """The plan is complete: freeze ``entries`` and compute the aggregates (once). Returns the plan."""
        if self._offsets is not None:
            raise RuntimeError(f"step {self.step}: the plan is sealed already")
        entries = tuple(self.entries)
        out, off = [], 0
        for e in entries:
            out.append(off)
            off += e.num_tokens
        _set(self, "entries", entries)
        _set(self, "_offsets", tuple(out))
        _set(self, "_num_tokens", off)
        return self

    @property
    def sealed(self) -> bool:
        return self._offsets is not None

    def _check_sealed(self, what: str) -> None:
        if self._offsets is None:
            raise RuntimeError(f"step {self.step}: StepPlan.{what} read before seal() (the entries may still change)")

    @property
    def num_tokens(self) -> int:
        self._check_sealed("num_tokens")
        return self._num_tokens

    def token_offsets(self) -> list[int]:
        """Where each entry's tokens start on the flattened ``[T]`` token axis (a fresh list: callers may keep it)."""
        self._check_sealed("token_offsets")
        return list(self._offsets)

    def logits_indices(self) -> list[int]:
        """Indices into the flattened ``[T]`` token axis (entries back to back, in order) whose logits are needed:
        the last ``num_logits`` tokens of each entry (``logits_to_keep`` for the forward). Computed per call: only
        tests read it (the packed step builds its own, padded_step.py)."""
        self._check_sealed("logits_indices")
        out = []
        for e, off in zip(self.entries, self._offsets):
            end = off + e.num_tokens
            out.extend(range(end - e.num_logits, end))
        return out
