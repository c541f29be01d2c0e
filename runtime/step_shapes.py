"""Static step shapes: which padded shape a decode step runs at, so a handful of CUDA graphs serve every step.

A captured graph fixes every tensor size and every host int the kernels were launched with. A decode step is
described by five numbers, each rounded up to a bucket:

* ``tokens`` (T): query tokens — buckets of at most 1/8 padding above 64 (T = 64 drafts + 8 verify chunks of
  9 = 136 runs at 144, 5.9% padding);
* ``requests`` (R): zero-length padding requests are skipped by the kernels at the cost of one early exit;
* ``scored`` (Rv): verify rows refreshing pillars (padding rows get budget 0 and a scratch pillar row);
* ``max_query_len``: 1 for pure single-token steps, else ``stride + 1`` (sets the kernel's query tile);
* ``max_seq_len``: the next power of two (at least 1,024) — the kernels' split-KV plan and the pillar scores'
  width are sized from it; keys past a request's own length are masked, so over-sizing only costs empty programs;

and one flag, ``sparse``: whether any row drafts from pillars (the attention's sparse variant, a graph of its own).

Steps that contain a prefill chunk are not graphed (their token counts are large and varied: vLLM, too, runs
them outside full graphs); ``shape_for`` returns None and the engine runs them at their ``exact_shape`` — through
the same packed buffer and the same context builder (padded_step.py, step_forward.py), unpadded. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import add, attrgetter

from .step_plan import Refresh, StepKind, StepPlan

MIN_SEQ_BUCKET = 1024


@dataclass(frozen=True)
class StepShape:
    tokens: int
    requests: int
    scored: int
    max_query_len: int
    max_seq_len: int
    table_width: int  # block-table columns: ceil(max_seq_len / page_size)
    logits: int = 0  # logits rows the forward keeps; 0: one per token (a graphed decode step: shape-fixed)
    # Some row drafts from pillars. A step with none (and nothing scored) runs without the pillar store: the
    # kernels' full-row variants, the stride-0 step's — a speculative config decoding plainly pays nothing for it.
    sparse: bool = False

    @property
    def num_logits(self) -> int:
        return self.logits or self.tokens

    @property
    def packed_size(self) -> int:
        """int64 entries of the packed host->device metadata buffer (see padded_step.py for the layout)."""
        return 3 * self.tokens + self.num_logits + (self.requests + 1) + 4 * self.requests \
            + self.requests * self.table_width + 3 * self.scored


def token_bucket(n: int) -> int:
    """Smallest bucket >= n: multiples of 8 up to 64, then steps of 1/8 of the power of two below n."""
    if n <= 0:
        raise ValueError(f"token_bucket: n must be >= 1, got {n}")
    if n <= 64:
        return -(-n // 8) * 8
    step = (1 << (n.bit_length() - 1)) // 8
    return -(-n // step) * step


def request_bucket(n: int) -> int:
    """1, 2, 4, 8, then 1/4-of-a-power-of-two steps (12, 16, 20, ... 24, 32, 40, 48, 56, 64, 80, ...)."""
    if n <= 0:
        return 0
    if n <= 8:
        return 1 << (n - 1).bit_length()
    step = (1 << (n.bit_length() - 1)) // 4
    return -(-n // step) * step


def seq_bucket(n: int) -> int:
    return max(MIN_SEQ_BUCKET, 1 << max(0, n - 1).bit_length())


def shape_for(plan: StepPlan, stride: int, page_size: int, max_tokens: int) -> StepShape | None:
    """The padded shape of ``plan``, or None when the step is not graphed (a prefill chunk in it, or more than
    ``max_tokens`` tokens — the largest shape worth a graph). Scored rows: verify rows with ``Refresh.SCORE``
    (streaming pillars are written by the host)."""
    entries = plan.entries
    if not entries or StepKind.PREFILL in map(_KIND, entries):
        return None
    n, seq = _token_counts(entries)
    t = sum(n)
    if t > max_tokens:
        return None
    longest = max(n)
    mq = 1 if longest == 1 and min(n) == 1 else stride + 1
    if longest > mq:
        return None
    seq = seq_bucket(seq)
    return StepShape(tokens=token_bucket(t), requests=request_bucket(len(entries)),
                     scored=request_bucket(_scored(entries)), max_query_len=mq, max_seq_len=seq,
                     table_width=-(-seq // page_size), sparse=True in map(_SPARSE, entries))


def exact_shape(plan: StepPlan) -> StepShape:
    """The unpadded shape of ``plan`` (an eager step: a prefill chunk in it, or no graphs).

    Dynamo specializes sizes 0 and 1 even on dims marked dynamic: a one-token step (the last request decoding alone)
    or a one-logit step would recompile the whole model (~40 s with Inductor for SmolLM2 on the H200). So tokens and
    logits are at least two: the extra token belongs to no request (past ``query_start_loc[R]``, slot -1), the
    extra logit rows point at token 0; the engine reads only the plan's rows."""
    entries = plan.entries
    n, seq = _token_counts(entries)
    return StepShape(
        tokens=max(sum(n), 2), requests=len(entries), scored=_scored(entries), max_query_len=max(n),
        max_seq_len=seq, table_width=max(map(len, map(_BLOCK_TABLE, map(_REQUEST, entries)))),
        logits=max(sum(map(_NUM_LOGITS, entries)), 2), sparse=True in map(_SPARSE, entries),
    )


# C-level maps over the entries instead of generator expressions: a shape costs ~0.14 ms instead of ~0.3 at B 256.
_KIND, _REFRESH, _REQUEST = attrgetter("kind"), attrgetter("refresh"), attrgetter("request")
_TOKEN_IDS, _START_POS, _NUM_LOGITS = attrgetter("token_ids"), attrgetter("start_pos"), attrgetter("num_logits")
_BLOCK_TABLE, _SPARSE = attrgetter("block_table"), attrgetter("sparse")


def _token_counts(entries) -> tuple[list[int], int]:
    """(each entry's query tokens, the longest seq_len)."""
    n = list(map(len, map(_TOKEN_IDS, entries)))
    return n, max(map(add, map(_START_POS, entries), n))


def _scored(entries) -> int:
    return list(map(_REFRESH, entries)).count(Refresh.SCORE)
