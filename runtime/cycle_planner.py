"""Cycle planning (torch-free): how many drafts each request makes this cycle, and on which step it verifies.

A cycle of ``j`` drafts is ``j`` DRAFT steps (1 token each) and one VERIFY step (``j+1`` tokens), ``+1`` step sat
out with delayed verification; ``j = 0`` is a plain decode. The stride policy (stride_policy.py) says which ``j``
are worth it for this request; this file picks among them to keep every step about the same size.

Why phases: if every request verified on the same step, step sizes would swing between ``n`` and ``n(k+1)``
tokens. So when a request enters its first cycle its ``j`` (0..k; that cycle drafts with full attention anyway) is
chosen to land its verify on the least-loaded phase ``verify_step mod C`` (``C = k+1``, ``k+2`` delayed). With a
fixed stride, ``n`` decoding requests and no departures every step then carries between ``n + k*floor(n/C)`` and
``n + k*ceil(n/C)`` tokens, about ``n(2k+1)/(k+1)`` (tested). With the adaptive stride cycle lengths differ and
drift apart, so *every* cycle start re-aligns, among the ``j`` the policy scores within a few per cent of its best.
The load of a phase is the extra tokens verifies put on it (``j`` above a 1-token row), so plain decodes weigh 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request, RequestState
from .stride_policy import StridePolicy

# enum members as globals (a read off the enum class costs ~0.18 us more; these run per request per step)
_ST_DRAFT, _ST_VERIFY, _ST_STALL = RequestState.DRAFT, RequestState.VERIFY, RequestState.STALL
_DECODING = (_ST_DRAFT, _ST_VERIFY, _ST_STALL)  # Request.is_decoding, without the call


def _num_decoding(reqs: list[Request]) -> int:
    states = [r.state for r in reqs]
    return states.count(_ST_DRAFT) + states.count(_ST_VERIFY) + states.count(_ST_STALL)


@dataclass
class CycleStats:
    """Every verified cycle of every request, counted once, here (``record_verify``, ``record_plain``): the run's
    telemetry."""

    cycles_by_k: list[int]  # [j] = cycles that drafted j (j = 0: plain decodes)
    judged_at: list[int]  # [i] = cycles in which draft i+1 was judged (the first i accepted)
    drafted_at: list[int]  # [i] = cycles that drafted at least i+1
    accepted_at: list[int]  # [i] = cycles that accepted at least i+1
    accepted_hist: list[int]  # [a] = full cycles (j == stride) that accepted a: the paper's accepted length
    full_cycles: int = 0

    @classmethod
    def empty(cls, stride: int) -> CycleStats:
        return cls([0] * (stride + 1), [0] * stride, [0] * stride, [0] * stride, [0] * (stride + 1))

    def record(self, stride: int, drafted: int, accepted: int) -> None:
        self.cycles_by_k[drafted] += 1
        if drafted:  # a plain decode (stride 0: every cycle) counts only in cycles_by_k
            _add_one(self.judged_at, min(accepted + 1, drafted))
            _add_one(self.drafted_at, drafted)
            _add_one(self.accepted_at, accepted)
        if drafted == stride > 0:
            self.full_cycles += 1
            self.accepted_hist[accepted] += 1


def _add_one(counts: list[int], n: int) -> None:
    """``counts[i] += 1`` for ``i < n``, as one slice assignment (a k = 8 verify's three loops of 1-9 steps were
    ~3 us a cycle)."""
    counts[:n] = [c + 1 for c in counts[:n]]


class CyclePlanner:
    def __init__(self, policy: StridePolicy, *, delayed_verify: bool, max_model_len: int) -> None:
        self.policy = policy
        self.stride = policy.stride
        # Plain decoding (stride 0) verifies nothing: its token is final when sampled, so it never sits out a step
        # (it used to: every token then took two steps — measured on the H200, bench/RESULTS.md).
        self.delayed_verify = delayed_verify and self.stride > 0
        self.cycle_len = self.stride + 1 + (1 if self.delayed_verify else 0)
        self.max_model_len = max_model_len
        self.stats = CycleStats.empty(self.stride)
        # A policy that prices a batch at once (AdaptiveStride.options_batch) is asked once per begin_cycles; any
        # other request by request.
        self._options = getattr(policy, "options_batch", None) or self._options_one_by_one

    def _options_one_by_one(self, reqs: list[Request], j_maxes: list[int], num_decoding: int) -> list[list[int]]:
        options = self.policy.options
        return [options(r, j_max, num_decoding) if j_max > 0 else [0] for r, j_max in zip(reqs, j_maxes)]

    def decode_load(self, n: int) -> int:
        """Tokens per step of ``n`` phase-balanced decoding requests (worst step)."""
        return n + self.stride * -(-n // self.cycle_len)

    def sits_out_after_verify(self, j: int) -> bool:
        """Delayed verification: a cycle sits out the step after its verify. With a fixed stride a 0-draft cycle (a
        phase-aligned first one, the last ones) does too, or its next verify would land one phase early; an
        adaptive plain decode (j = 0) does not: its token is final when sampled (overlap runs it on a placeholder)."""
        return self.delayed_verify and (j > 0 or not self.policy.adaptive)

    def begin_cycles(self, reqs: list[Request], step: int, running: list[Request], first: bool = False) -> None:
        """Start the next cycle of each of ``reqs`` (in order) after ``step``: its ``j``, state DRAFT / VERIFY, or
        STALL to land on a phase. The phase load and the decoding count are computed once for the batch (every
        running request but ``reqs``) and each request's own verify added once it is placed. An O(batch) scan per
        cycle start cost 4 ms of host time per step at batch 256, k = 8 (update 5.8 vs 1.8 ms fixed). The adaptive
        policy's options come in one call for all of ``reqs``, priced as arrays: at B 256 with the seed prices and
        60% acceptance (mostly plain decodes, ~33 requests re-priced a step) the adaptive update costs 0.33-0.41 ms
        a step more than stride 0's, against 0.75-1.0 ms priced request by request (a loaded 2-core CPU)."""
        if not reqs:
            return
        load = None
        adaptive = self.policy.adaptive
        j_maxes = []
        for r in reqs:
            num_output = len(r.output_token_ids)
            remaining = min(r.params.max_tokens - num_output,
                            self.max_model_len - len(r.prompt_token_ids) - num_output)
            j_maxes.append(min(self.stride, remaining - 1))  # a verify emits up to j+1 tokens: no drafts past it
        options_of = None
        if adaptive:
            # only the adaptive policy reads it; counted in C (list.count), not by a generator over the batch
            num_decoding = _num_decoding(running) + len(reqs) - _num_decoding(reqs)
            options_of = self._options(reqs, j_maxes, num_decoding)
        for i, r in enumerate(reqs):
            j_max = j_maxes[i]
            options = None  # None: j_max alone (a fixed stride past its first cycle: nothing to balance)
            if adaptive:
                options = options_of[i]
            elif first and j_max > 0:
                # With delayed verification a cycle is k+2 steps but drafts reach only k+1 verify phases; the last
                # one is reached by sitting out one step first (without it, steps drifted k tokens past the bound).
                options = list(range(j_max + 1 + (self.delayed_verify and j_max == self.stride)))
            j = options[0] if options is not None else j_max
            if options is not None and len(options) > 1:
                if load is None:
                    load = self._phase_load(step, running, exclude={id(o) for o in reqs})
                nxt = step + 1
                if adaptive:  # the policy's order breaks ties: its best first
                    j = min(options, key=lambda c: load[(nxt + c) % self.cycle_len])
                else:
                    j = min(options, key=lambda c: (load[(nxt + c) % self.cycle_len], c > j_max, -c))
            self._place(r, j, j_max, step)
            if load is not None and r.state in _DECODING:
                at, weight = self._next_verify(r, step)
                load[at % self.cycle_len] += weight

    def _place(self, r: Request, j: int, j_max: int, step: int) -> None:
        if j > j_max:  # sit out one step first: the only way to reach the last phase
            r.state, r.stall_until = _ST_STALL, step + 1
            return
        r.num_cycle_drafts = j
        r.draft_token_ids = []
        r.cycle_refresh = self.policy.refresh_after(r, j)
        r.state = _ST_DRAFT if j > 0 else _ST_VERIFY

    def _next_verify(self, o: Request, step: int) -> tuple[int, int]:
        """(step of ``o``'s next verify, its weight in the phase load: its drafts, or 1 per request at a fixed
        stride)."""
        if o.state is _ST_STALL:
            at, weight = o.stall_until + 1 + self.stride, self.stride
        else:
            at, weight = step + 1 + o.num_cycle_drafts - len(o.draft_token_ids), o.num_cycle_drafts
        return at, weight if self.policy.adaptive else 1

    def _phase_load(self, step: int, running: list[Request], exclude: set[int]) -> list[int]:
        load = [0] * self.cycle_len
        for o in running:
            if o.state in _DECODING and id(o) not in exclude:
                at, weight = self._next_verify(o, step)
                load[at % self.cycle_len] += weight
        return load

    def record_plain(self, reqs: list[Request]) -> None:
        """``record_verify(r, 0, 0)`` of each of ``reqs`` (overlap's plain decodes: the whole batch every step at
        stride 0), the run's count added once."""
        record = self.policy.record
        for r in reqs:
            m = r.metrics
            m.accepted.append(0)
            m.drafted.append(0)
            record(r, 0, 0)
        self.stats.cycles_by_k[0] += len(reqs)  # CycleStats.record of a 0-draft cycle counts only this

    def record_verify(self, r: Request, drafted: int, accepted: int) -> None:
        """The one place acceptance is counted: the request's metrics, its decayed estimate (the policy), the run's."""
        r.metrics.accepted.append(accepted)
        r.metrics.drafted.append(drafted)
        self.policy.record(r, drafted, accepted)
        self.stats.record(self.stride, drafted, accepted)
