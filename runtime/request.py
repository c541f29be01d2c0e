"""Request state (torch-free): what the scheduler knows about one generation.

Life cycle (stride ``k`` > 0)::

    WAITING ─admit─▶ PREFILL (chunks) ─last chunk samples t0─▶ DRAFT ×j ─▶ VERIFY ─▶ (STALL) ─▶ DRAFT ×k ─▶ VERIFY …
                                                                                                     └─▶ FINISHED

* Token bookkeeping: ``all_token_ids = prompt + output``. Outside prefill the KV of every token but the last
  sampled one is in the cache: ``num_computed_tokens == len(all_token_ids) - 1``. The last sampled token
  (``last_token_id``) is the first input of the next cycle.
* A cycle drafts ``j = num_cycle_drafts`` tokens (``k``, fewer for the first cycle — phase alignment — or near
  ``max_tokens``), one per DRAFT step: draft step ``i`` (0-based) feeds token ``[last, d1..dj][i]`` at position
  ``num_computed_tokens + i`` and yields ``d_{i+1}``. The VERIFY step then feeds ``[last, d1..dj]`` at positions
  ``num_computed_tokens .. num_computed_tokens + j`` with full attention (rewriting the sparse drafts' KV).
* ``draft_start`` is the first position of the last verify chunk: the next cycle's drafts attend densely to every
  position ``>= draft_start`` and sparsely (pillars) before it. ``has_pillars`` is False until the first
  verification after (re)prefill: that cycle drafts with full attention.
* Stride 0 (plain decoding) is the degenerate cycle ``j = 0``: every decode step is a 1-token VERIFY.
* Offload (``SWAPPED``): under page pressure a running request's pages (and pillar row) are copied to the host
  pool and freed; everything else is kept as is — state, drafts of the interrupted cycle, ``draft_start``,
  ``has_pillars`` — and on restore it continues exactly where it was (``swapped_state``). No token is recomputed.
* Sitting out (``STALL``): ``stall_until`` is the last step it sits out (delayed verification, phase alignment);
  ``held`` keeps it out beyond that until the engine has read its result (overlap).
* Per-request speculation (``acceptance``, ``cycle_refresh``): the cycle planner picks each cycle's ``j`` from this
  request's own decayed per-position acceptance (cycle_planner.py, stride_policy.py).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from .acceptance import AcceptanceStats, per_position
from .sampling_params import SamplingParams


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, no KV (also after a preemption)
    PREFILL = "prefill"  # admitted, prompt KV being written chunk by chunk
    DRAFT = "draft"  # drafting this cycle's tokens, one per step
    VERIFY = "verify"  # drafts done; the next step verifies them
    STALL = "stall"  # delayed verification: sits out one step while the host consumes its result
    SWAPPED = "swapped"  # KV offloaded to the host pool; resumes in ``swapped_state`` when restored
    FINISHED = "finished"


# Module constants: reading a member off the enum class (``RequestState.FINISHED``) costs ~0.18 us more than a
# global (Python 3.11), and the per-request checks run thousands of times a step.
_FINISHED = RequestState.FINISHED
DECODING_STATES = (RequestState.DRAFT, RequestState.VERIFY, RequestState.STALL)  # a tuple: `in` is identity first

_ids = itertools.count()


@dataclass
class RequestMetrics:
    accepted: list[int] = field(default_factory=list)  # accepted drafts per cycle (0..j)
    drafted: list[int] = field(default_factory=list)  # drafts proposed per cycle (j)
    num_preemptions: int = 0  # recompute preemptions (KV dropped, re-prefilled later)
    num_offloads: int = 0  # swaps to the host pool (KV kept, nothing recomputed)
    offload_fallbacks: int = 0  # recompute preemptions taken because the host pool was full
    # draft recall at each scored verification (kernels/hybrid.py draft_recall), mean over layers and KV heads: the
    # share of the verify queries' attention the next cycle's draft keeps; and per layer, summed over those cycles
    recall: list[float] = field(default_factory=list)
    recall_by_layer: list[float] = field(default_factory=list)
    arrival_step: int = -1
    first_token_step: int = -1
    finish_step: int = -1

    def mean_accepted(self, stride: int) -> float:
        """Mean drafts accepted per full ``stride``-draft cycle, the paper's "accepted length" (6.16 of 8).

        Shortened cycles (the phase-aligned first one, the last ones before ``max_tokens``) are left out: they
        would drag the mean down for a reason unrelated to draft quality.
        """
        full = [a for a, d in zip(self.accepted, self.drafted) if d == stride]
        return sum(full) / len(full) if full else 0.0

    def add_recall(self, per_layer: list[float]) -> None:
        self.recall.append(sum(per_layer) / len(per_layer))
        if not self.recall_by_layer:
            self.recall_by_layer = [0.0] * len(per_layer)
        self.recall_by_layer = [a + b for a, b in zip(self.recall_by_layer, per_layer)]

    def speculation(self, stride: int, num_output: int) -> dict:
        """Per-request telemetry: the mean k chosen, acceptance by position (over the cycles that drafted it), and
        tokens per step of its decode (first token to finish; ~1 for plain decoding in a step with room)."""
        steps = self.finish_step - self.first_token_step
        return {
            "mean_k": sum(self.drafted) / len(self.drafted) if self.drafted else 0.0,
            "per_position_acceptance": per_position(self.accepted, self.drafted, stride),
            "decode_steps": steps if self.first_token_step >= 0 else None,
            "tokens_per_step": (num_output - 1) / steps if self.first_token_step >= 0 and steps > 0 else None,
            "mean_recall": sum(self.recall) / len(self.recall) if self.recall else None,
            "recall_by_layer": [x / len(self.recall) for x in self.recall_by_layer] if self.recall else None,
        }


class Request:
    """One prompt being generated. Construction validates the prompt (``ValueError`` naming the problem)."""

    def __init__(self, prompt_token_ids, params: SamplingParams | None = None,
                 request_id: int | None = None) -> None:
        if isinstance(prompt_token_ids, (str, bytes)):
            raise ValueError("Request.prompt_token_ids must be a sequence of token ids, got a string: tokenize it first")
        try:
            prompt = [int(t) for t in prompt_token_ids]
        except (TypeError, ValueError):
            raise ValueError(f"Request.prompt_token_ids must be a sequence of ints, got {prompt_token_ids!r}") from None
        if not prompt:
            raise ValueError("Request.prompt_token_ids is empty: a prompt needs at least one token")
        if min(prompt) < 0:
            raise ValueError(f"Request.prompt_token_ids holds a negative token id ({min(prompt)})")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"Request.params must be a SamplingParams, got {type(params).__name__}")
        self.request_id = next(_ids) if request_id is None else request_id
        self.prompt_token_ids = prompt
        self.params = params
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[dict[int, float]] = []  # SamplingParams.logprobs: one per output token
        self.state = RequestState.WAITING
        self.num_computed_tokens = 0  # tokens whose (verified) KV is in the cache
        self.block_table: list[int] = []
        self.pillar_slot = -1  # row in the PillarStore while admitted
        self.admit_order = -1  # position in the scheduler's running order (set at each admission)
        self.host_blocks: list[int] = []  # host pool pages holding the KV while SWAPPED
        self.host_row = -1  # host pillar row while SWAPPED
        self.swapped_state: RequestState | None = None  # state to resume in when restored
        self.draft_token_ids: list[int] = []  # this cycle's drafts so far
        self.num_cycle_drafts = 0  # j: drafts this cycle will make before verifying
        self.draft_start = 0
        self.has_pillars = False
        self.num_pending = 0  # overlap, plain decodes: trailing output tokens that are still device placeholders
        # stop strings (stop_strings.StopStrings, set by LLM: needs the tokenizer): (ids, n) -> the text of ids[:n]
        # contains one
        self.stop_check = None
        self.stall_until = -1  # STALL: sits out every step up to this one
        self.held = False  # STALL until the engine has read this request's result from the device (overlap)
        self.cycle_refresh = False  # this cycle's verify refreshes the pillars (the next cycle drafts with them)
        self.acceptance = AcceptanceStats()  # decayed per-position acceptance (the adaptive stride reads it)
        self.plain_cycles = 0  # adaptive: cycles in a row at j = 0 since it last speculated
        self.probe_interval = 0  # adaptive: plain cycles before the next probe (0: not set yet)
        self.wants_pillars = False  # adaptive: decodes plainly only for lack of pillars (its decode scores them)
        self.finish_reason: str | None = None  # "stop" | "length" | "error: ..." | "abort"
        self.metrics = RequestMetrics()

    # ---- derived ------------------------------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def prefill_target(self) -> int:
        """Tokens prefill must bring into the cache: the prompt, or after a preemption all but the last sampled."""
        return self.num_tokens - 1 if self.output_token_ids else self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.state is _FINISHED

    @property
    def is_decoding(self) -> bool:
        return self.state in DECODING_STATES

    def __repr__(self) -> str:
        return (f"Request(id={self.request_id}, state={self.state.value}, prompt={self.num_prompt_tokens}, "
                f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens}, "
                f"drafts={len(self.draft_token_ids)}/{self.num_cycle_drafts})")
