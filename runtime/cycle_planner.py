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


@dataclass
class CycleStats:
    """Every verified cycle of every request, counted once, here (``record_verify``): the run's telemetry."""

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
        for i in range(min(accepted + 1, drafted)):
            self.judged_at[i] += 1
        for i in range(drafted):
            self.drafted_at[i] += 1
        for i in range(accepted):
            self.accepted_at[i] += 1
        if drafted == stride > 0:
            self.full_cycles += 1
            self.accepted_hist[accepted] += 1


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

    def decode_load(self, n: int) -> int:
        """Tokens per step of ``n`` phase-balanced decoding requests (worst step)."""
        return n + self.stride * -(-n // self.cycle_len)

    def sits_out_after_verify(self, j: int) -> bool:
        """Delayed verification: a cycle sits out the step after its verify. With a fixed stride a 0-draft cycle (a
        phase-aligned first one, the last ones) does too, or its next verify would land one phase early; an
        adaptive plain decode (j = 0) does not: its token is final when sampled (overlap runs it on a placeholder)."""
        return self.delayed_verify and (j > 0 or not self.policy.adaptive)

    def begin_cycle(self, r: Request, step: int, running: list[Request], first: bool = False) -> None:
        """Start ``r``'s next cycle after ``step``: its ``j``, state DRAFT / VERIFY, or STALL to land on a phase."""
        remaining = min(r.params.max_tokens - len(r.output_token_ids), self.max_model_len - r.num_tokens)
        j_max = min(self.stride, remaining - 1)  # a verify emits up to j+1 tokens; don't draft past the limit
        nxt = step + 1
        stall = False
        if self.policy.adaptive:
            options = self.policy.options(r, j_max, sum(1 for o in running if o.is_decoding)) if j_max > 0 else [0]
            j = options[0]
            if len(options) > 1:
                load = self._phase_load(r, step, running)
                j = min(options, key=lambda c: (load[(nxt + c) % self.cycle_len], -c))
        else:
            j = j_max
            if first and j_max > 0:
                load = self._phase_load(r, step, running)
                # With delayed verification a cycle is k+2 steps but drafts reach only k+1 verify phases; the last
                # one is reached by sitting out one step first (without it, steps drifted k tokens past the bound).
                c_max = j_max + 1 if self.delayed_verify and j_max == self.stride else j_max
                j = min(range(c_max + 1), key=lambda c: (load[(nxt + c) % self.cycle_len], c > j_max, -c))
                stall = j > j_max
        if stall:
            r.state, r.stall_until = RequestState.STALL, nxt
            return
        r.num_cycle_drafts = j
        r.draft_token_ids = []
        r.cycle_refresh = self.policy.refresh_after(r, j)
        r.state = RequestState.DRAFT if j > 0 else RequestState.VERIFY

    def _phase_load(self, r: Request, step: int, running: list[Request]) -> list[int]:
        load = [0] * self.cycle_len
        for o in running:
            if o is not r and o.is_decoding:
                if o.state is RequestState.STALL:
                    at, weight = o.stall_until + 1 + self.stride, self.stride
                else:
                    at, weight = step + 1 + o.num_cycle_drafts - len(o.draft_token_ids), o.num_cycle_drafts
                load[at % self.cycle_len] += weight if self.policy.adaptive else 1
        return load

    def record_verify(self, r: Request, drafted: int, accepted: int) -> None:
        """The one place acceptance is counted: the request's metrics, its decayed estimate (the policy), the run's."""
        r.metrics.accepted.append(accepted)
        r.metrics.drafted.append(drafted)
        self.policy.record(r, drafted, accepted)
        self.stats.record(self.stride, drafted, accepted)
