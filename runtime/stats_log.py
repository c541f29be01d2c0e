"""A one-line progress log of the step loop every ``interval`` seconds (``SparseSpecConfig.log_stats_interval``), as
vLLM's engine logs its throughput: what a user watches on a long run, and what says *why* a run is slow before it
ends — host time by stage against device time, graphs captured, Dynamo compiles, the k the adaptive stride chose.

Each line covers the interval since the previous one (counters subtracted), from ``LLM.stats()``:

    steps 812 (81.2/s) | out 40.3k tok/s | running 256 waiting 250 | 255.6 req/step | k 3.12 acc 0.71 |
    gpu busy 92% | host ms/step: schedule 1.10 launch 2.30 resolve 4.50 (wait 2.10) | graphs 41 (+3, 0.5 s)
    | compiles 0 (+0.0 s)
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("sparsespec.runtime")

_COUNTERS = ("steps", "output_tokens", "request_steps", "seconds", "gpu_busy_seconds", "schedule_seconds",
             "launch_seconds", "resolve_seconds", "wait_seconds", "capture_seconds", "compile_seconds", "all_cycles",
             "graph_steps")


class StatsLog:
    """``maybe_log()`` after each step; logs at most once per ``interval`` seconds of wall time. ``snapshot()``:
    ``LLM.stats()``-shaped dict; ``queue()``: (running, waiting) request counts."""

    def __init__(self, interval: float, snapshot: Callable[[], dict], queue: Callable[[], tuple[int, int]]) -> None:
        self.interval, self.snapshot, self.queue = interval, snapshot, queue
        self._last = time.perf_counter()
        self._prev: dict | None = None

    def maybe_log(self) -> str | None:
        now = time.perf_counter()
        if self._prev is None:
            self._prev, self._last = self.snapshot(), now
            return None
        if now - self._last < self.interval:
            return None
        cur = self.snapshot()
        if cur.get("steps", 0) < self._prev.get("steps", 0):  # stats(reset=True) since the last line
            self._prev = {}
        line = format_line(self._prev, cur, now - self._last, *self.queue())
        self._prev, self._last = cur, now
        log.info("%s", line)
        return line


def format_line(prev: dict, cur: dict, wall: float, running: int, waiting: int) -> str:
    d = {k: cur.get(k, 0) - prev.get(k, 0) for k in _COUNTERS}
    steps = d["steps"]
    per = (lambda x: 1e3 * x / steps) if steps else (lambda x: 0.0)
    k_sum = sum(j * (n - p) for j, (n, p) in enumerate(zip(cur.get("cycles_by_k", []), prev.get("cycles_by_k", []))))
    drafted = sum(cur.get("position_drafted", [])) - sum(prev.get("position_drafted", []))
    accepted = sum(cur.get("position_accepted", [])) - sum(prev.get("position_accepted", []))
    cycles = d["all_cycles"]
    parts = [
        f"steps {steps} ({steps / wall:.1f}/s)",
        f"out {d['output_tokens'] / wall / 1e3:.1f}k tok/s",
        f"running {running} waiting {waiting}",
        f"{d['request_steps'] / steps if steps else 0.0:.1f} req/step",
        f"graphed {100 * d['graph_steps'] / steps if steps else 0.0:.0f}%",
        f"k {k_sum / cycles if cycles else 0.0:.2f} acc {accepted / drafted if drafted else 0.0:.2f}",
    ]
    if d["gpu_busy_seconds"]:
        parts.append(f"gpu busy {100 * d['gpu_busy_seconds'] / wall:.0f}%")
    parts.append(f"host ms/step: schedule {per(d['schedule_seconds']):.2f} launch {per(d['launch_seconds']):.2f} "
                 f"resolve {per(d['resolve_seconds']):.2f} (wait {per(d['wait_seconds']):.2f})")
    parts.append(f"graphs {cur.get('cuda_graphs', 0)} (+{cur.get('cuda_graphs', 0) - prev.get('cuda_graphs', 0)}, "
                 f"{d['capture_seconds']:.1f} s)")
    parts.append(f"compiles {cur.get('compile_steps', 0)} (+{d['compile_seconds']:.1f} s)")
    gate = cur.get("speculation_gate")
    if gate:
        parts.append(f"gate {gate['mode']} (won by {gate['winner'] or '-'}, {gate['rounds']} rounds, "
                     f"{gate.get('early_stops', 0)} stopped early, {gate.get('skipped', 0)} skipped)")
    prices = cur.get("step_cost")
    if prices:  # the adaptive stride's fitted step costs (step_cost.py): c0, per token, per full key, per sparse key
        parts.append("prices {:.2f} ms + {:.2f} us/tok + {:.1f} ns/key + {:.1f} ns/sparse key".format(
            1e3 * prices[0], 1e6 * prices[1], 1e9 * prices[2], 1e9 * prices[3]))
    return " | ".join(parts)
