"""Whether the batch speculates at all, decided by measured goodput (torch-free).

The per-request adaptive stride (stride_policy.py) chooses each request's k from a step-cost model. That model can
only price what the steps it has seen exercised, and some costs are the step's, not a row's: one speculating row
brings the pillar scoring and selection launches of every layer into the step, a second family of CUDA-graph shapes,
and the sampler's verify path. On the H200 (SmolLM2, B 256, 4,096 outputs, bench/RESULTS.md) the adaptive default
chose k = 0 for 99% of its cycles, yet its decode step cost 6.09 ms against stride 0's 5.00 ms: the remaining
probes and pillar refreshes put that machinery into nearly every step.

So the batch alternates between two modes and keeps the one that measures faster:

* ``plain``: every request decodes plainly (k = 0, no probes, no pillar refresh): the step is a stride-0 step;
* ``speculate``: the per-request adaptive stride decides (requests it prices out still decode plainly).

A measuring round runs each mode for ``warm`` steps (cycles in flight settle; those are not counted) and then
``window`` steps whose output tokens per second of step time are its goodput. The faster mode (speculation must
win by ``margin``) then runs for ``exploit`` steps before the next round; the span doubles each time the same mode
wins again (up to ``exploit_max``) and falls back to ``exploit_first`` when the winner changes, so a workload that
never pays for speculation spends about one window in ``exploit_first``, then in ``2 * exploit_first``, ... on it. A
round whose two windows ran very different batches (admission, a draining batch: mean requests per step more than
``max_batch_change`` apart) says nothing and is run again. Plain mode is measured first: the first steps of an
engine are never slower than plain decoding because of the gate.

Two rules bound what a losing round costs (H200, SmolLM2, bench/RESULTS.md: speculation measured 0.32-0.93x plain's
goodput in every cell of the never-slower grid, and its rounds cost the default 3-6% of the run):

* **early stop**: once ``early_steps`` (48) of speculation's window are measured, a goodput below ``1 - early_loss`` (0.85) of
  plain's ends the round there (plain wins): at B 1 speculation measured 0.32x, and a full 192-step window of it
  cost ~5% of an 8,000-token run;
* **nothing to win**: the speculative half is not started when the batch has fewer than ``2 * (warm + window)``
  decode steps left (``remaining``: the most tokens a running or waiting request may still emit, from the engine): a winner found then
  could not run long enough to repay the round (256-token outputs: the round would be most of the run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PLAIN, SPECULATE = "plain", "speculate"


@dataclass
class _Window:
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    requests: int = 0

    def add(self, tokens: int, seconds: float, requests: int) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.requests += requests

    @property
    def goodput(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def batch(self) -> float:
        return self.requests / self.steps if self.steps else 0.0


class SpeculationGate:
    def __init__(self, warm: int = 32, window: int = 192, exploit_first: int = 2048, exploit_max: int = 32768,
                 margin: float = 0.02, max_batch_change: float = 0.25, early_steps: int = 48,
                 early_loss: float = 0.15) -> None:
        if min(warm, window, exploit_first, early_steps) < 0 or window == 0 or exploit_max < exploit_first:
            raise ValueError(f"SpeculationGate: bad schedule warm={warm} window={window} "
                             f"exploit_first={exploit_first} exploit_max={exploit_max} early_steps={early_steps}")
        if not 0.0 < early_loss <= 1.0:
            raise ValueError(f"SpeculationGate.early_loss must be in (0, 1], got {early_loss}")
        self.warm, self.window, self.margin, self.max_batch_change = warm, window, margin, max_batch_change
        self.exploit_first, self.exploit_max = exploit_first, exploit_max
        self.early_steps, self.early_loss = early_steps, early_loss
        self.exploit = exploit_first
        self.winner: str | None = None
        self.rounds = 0  # measuring rounds completed (decided or not)
        self.early_stops = 0  # rounds that speculation lost before its window was full
        self.skipped = 0  # speculative halves not started: too few steps left to repay them
        self.goodput: dict[str, float] = {}  # the last round's measured tokens/s per mode
        # decode steps the batch has left at least (the engine sets it: Engine._steps_left); None: unknown
        self.remaining: Callable[[], int] | None = None
        self._start_round()

    # ---- what the stride policy asks -------------------------------------------------------------------------
    @property
    def speculating(self) -> bool:
        return self.mode == SPECULATE

    @property
    def round_steps(self) -> int:
        """Steps of one measuring round (both modes)."""
        return 2 * (self.warm + self.window)

    def fresh(self) -> "SpeculationGate":
        """A new gate with this one's schedule, in its first round (what an engine starts with)."""
        return SpeculationGate(self.warm, self.window, self.exploit_first, self.exploit_max, self.margin,
                               self.max_batch_change, self.early_steps, self.early_loss)

    # ---- one step's outcome ----------------------------------------------------------------------------------
    def observe(self, tokens: int, seconds: float, requests: int) -> None:
        """A step's output tokens, its time (wall or device: the same clock for every step) and its request
        count. Steps not measured (``seconds <= 0``: a step that captured a CUDA graph, or held a prefill chunk)
        still advance the schedule but are not counted."""
        self._left -= 1
        if self._measuring is not None and self._left < self.window and seconds > 0:
            self._measuring.add(tokens, seconds, requests)
            if self.mode == SPECULATE and self._losing_early():
                self.early_stops += 1
                self._decide()
                return
        if self._left > 0:
            return
        if self._measuring is None:  # an exploit span ended
            self._start_round()
        elif self.mode == PLAIN:
            self._plain = self._measuring
            if self.remaining is not None and self.remaining() < self.round_steps:
                self.skipped += 1  # nothing to win: plain on, and a new round once this span is over
                self._begin(PLAIN, self.warm + self.window, None)
            else:
                self._begin(SPECULATE, self.warm + self.window, _Window())
        else:
            self._decide()

    def _losing_early(self) -> bool:
        spec, plain = self._measuring, self._plain
        return (spec is not None and plain is not None and spec.steps >= self.early_steps and plain.steps > 0
                and spec.goodput < (1.0 - self.early_loss) * plain.goodput)

    def _start_round(self) -> None:
        self._plain: _Window | None = None
        self._begin(PLAIN, self.warm + self.window, _Window())

    def _begin(self, mode: str, steps: int, window: _Window | None) -> None:
        self.mode, self._left, self._measuring = mode, steps, window

    def _decide(self) -> None:
        plain, spec = self._plain, self._measuring
        self.rounds += 1
        assert plain is not None and spec is not None
        self.goodput = {PLAIN: plain.goodput, SPECULATE: spec.goodput}
        lo, hi = sorted((plain.batch, spec.batch))
        if not plain.steps or not spec.steps or hi > 0 and (hi - lo) / hi > self.max_batch_change:
            self._start_round()  # the batch changed under the measurement: measure again
            return
        winner = SPECULATE if spec.goodput > (1.0 + self.margin) * plain.goodput else PLAIN
        if winner == self.winner:
            self.exploit = min(2 * self.exploit, self.exploit_max)
        else:
            self.winner, self.exploit = winner, self.exploit_first
        self._begin(winner, self.exploit, None)


def default_gate(adaptive: bool, stride: int, tp_world: int) -> SpeculationGate | None:
    """The engine's gate: one for an adaptive speculative config on one device. None under tensor parallelism (each
    rank would judge its own wall clock, and every rank must make the same plan: the rank-0 prices decide there)
    and for a fixed stride."""
    return SpeculationGate() if adaptive and stride > 0 and tp_world == 1 else None
