"""``/metrics`` in the Prometheus text format (prometheus-client), on a registry of the server's own (two servers in
one process, as in the tests, do not collide).

Counters and histograms are updated as things happen (the thread that hears from the step loop; prometheus-client is
thread-safe); the engine's state (running / waiting requests, KV pages, acceptance, the stride chosen) is sampled
next to the step loop after a step at most every 0.5 s (``step_output.StepOutputs``) and handed over as a snapshot,
so a scrape reads numbers and never touches the scheduler mid-step (nor needs the process that runs it).
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0)


class ServerMetrics:
    def __init__(self, model_name: str, *, window_s: float = 10.0) -> None:
        self.registry = r = CollectorRegistry()
        lab = {"model_name": model_name}
        self.window_s = window_s

        def gauge(name, doc, labels=()):
            g = Gauge(f"sparsespec_{name}", doc, ["model_name", *labels], registry=r)
            return g if labels else g.labels(**lab)

        self._lab = lab
        self.prompt_tokens = Counter("sparsespec_prompt_tokens", "Prompt tokens of accepted requests",
                                     ["model_name"], registry=r).labels(**lab)
        self.generation_tokens = Counter("sparsespec_generation_tokens", "Output tokens streamed",
                                         ["model_name"], registry=r).labels(**lab)
        self._finished = Counter("sparsespec_request_finished", "Finished requests by finish reason",
                                 ["model_name", "finish_reason"], registry=r)
        self.time_to_first_token = Histogram("sparsespec_time_to_first_token_seconds",
                                             "Arrival to the first output token", ["model_name"],
                                             buckets=_LATENCY_BUCKETS, registry=r).labels(**lab)
        self.inter_token_latency = Histogram("sparsespec_inter_token_latency_seconds",
                                             "Gap between successive output chunks of a request (a verify may "
                                             "bring several tokens at once)", ["model_name"],
                                             buckets=_LATENCY_BUCKETS, registry=r).labels(**lab)
        self.e2e_latency = Histogram("sparsespec_e2e_request_latency_seconds", "Arrival to the last output token",
                                     ["model_name"], buckets=_LATENCY_BUCKETS, registry=r).labels(**lab)
        self.running = gauge("num_requests_running", "Requests admitted (holding KV pages)")
        self.waiting = gauge("num_requests_waiting", "Requests queued for admission")
        self.swapped = gauge("num_requests_swapped", "Requests offloaded to the host KV pool")
        self.pages_used = gauge("kv_pages_used", "KV pages in use")
        self.pages_total = gauge("kv_pages_total", "KV pages in the device pool")
        self.tokens_per_s = gauge("generation_tokens_per_second", f"Output tokens/s over the last {window_s:g} s")
        self.mean_accepted = gauge("mean_accepted_length", "Mean drafts accepted per full cycle (k = stride)")
        self.per_position = gauge("acceptance_rate", "Share of cycles drafting this position that accepted it",
                                  ["position"])
        self.stride = gauge("stride", "Maximum draft tokens per cycle (k)")
        self.mean_k = gauge("stride_mean_chosen", "Mean draft tokens chosen per cycle (adaptive stride)")
        self.cycles_by_k = gauge("cycles_by_k", "Draft/verify cycles that drafted k tokens", ["k"])
        self.steps = gauge("engine_steps", "Engine steps run")
        # one-offs inside steps (a shape or a graph first met under load): what a warm-up should have absorbed
        self.capture_seconds = gauge("engine_graph_capture_seconds", "Time the step loop spent capturing CUDA graphs")
        self.compile_seconds = gauge("engine_compile_seconds", "Time the step loop spent in Dynamo compiles")
        # Where the server's time goes, for bench/serve_load.py to tell a server-bound run from a client-bound one
        # over its load window: the step loop's own wall time in steps (a step slowed by the event loop holding the
        # interpreter lock shows here) and CPU time, next to the whole process's CPU (process_cpu_seconds_total).
        self.steps_run = Counter("sparsespec_engine_steps_run", "Engine steps run by the step loop", ["model_name"],
                                 registry=r).labels(**lab)
        self.step_seconds = Counter("sparsespec_engine_step_seconds", "Wall time of the step loop inside steps",
                                    ["model_name"], registry=r).labels(**lab)
        self.engine_cpu = gauge("engine_thread_cpu_seconds", "CPU time of the step loop's thread")
        self.engine_in_process = gauge("engine_in_server_process", "1: the step loop is a thread of this process (its "
                                       "CPU is in process_cpu_seconds_total); 0: it runs in a child process")
        ProcessCollector(registry=r)
        self._tokens = 0  # generation_tokens' value, kept here to avoid the client library's internals
        self._recent: deque[tuple[float, int]] = deque()  # (time, output tokens so far)

    def add_generation_tokens(self, n: int) -> None:
        self._tokens += n
        self.generation_tokens.inc(n)

    def step_done(self, seconds: float, loop_cpu: float) -> None:
        """One step of the step loop took ``seconds``; the step loop has used ``loop_cpu`` seconds of CPU so far."""
        self.steps_run.inc()
        self.step_seconds.inc(seconds)
        self.engine_cpu.set(loop_cpu)

    def finished(self, reason: str) -> None:
        self._finished.labels(finish_reason="error" if reason.startswith("error") else reason, **self._lab).inc()

    def observe(self, snap: dict) -> None:
        """The engine's state as the step loop sampled it (``step_output.engine_snapshot``)."""
        now = time.monotonic()
        self.running.set(snap["running"])
        self.waiting.set(snap["waiting"])
        self.swapped.set(snap["swapped"])
        self.pages_total.set(snap["pages_total"])
        self.pages_used.set(snap["pages_used"])
        tokens = self._tokens
        self._recent.append((now, tokens))
        while len(self._recent) > 2 and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()
        t0, n0 = self._recent[0]
        self.tokens_per_s.set((tokens - n0) / (now - t0) if now > t0 else 0.0)
        self.steps.set(snap["steps"])
        self.capture_seconds.set(snap["capture_seconds"])
        self.compile_seconds.set(snap["compile_seconds"])
        self.stride.set(snap["stride"])
        self.mean_accepted.set(snap["mean_accepted"])
        self.mean_k.set(snap["mean_k"])
        for i, rate in enumerate(snap["per_position_acceptance_all"], start=1):
            self.per_position.labels(position=str(i), **self._lab).set(rate)
        for k, n in enumerate(snap["cycles_by_k"]):
            self.cycles_by_k.labels(k=str(k), **self._lab).set(n)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["ServerMetrics"]
