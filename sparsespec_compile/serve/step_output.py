"""The engine side of serving, model in hand: what the HTTP side needs to know about the model once (``ModelInfo``),
and after each step what the requests gained (``StepOutputs`` -> ``StepMessage``).

Both engines run this next to the step loop — the thread engine in its thread, the process engine in its child
process — and hand the ``StepMessage`` to the HTTP side (a function call, or one pickled message over a pipe), which
delivers the deltas and updates the metrics (``engine_base.EngineBase.dispatch``). Everything here is picklable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sparsespec_compile.runtime.llm import LLM, RequestOutput, check_request
from sparsespec_compile.runtime.request import Request


@dataclass
class ModelInfo:
    """What the HTTP side reads about the model: prompt checks, detokenization, the length limits."""

    tokenizer: object
    vocab_size: int
    max_model_len: int
    num_pages: int
    page_size: int
    stride: int

    @classmethod
    def of(cls, llm: LLM) -> "ModelInfo":
        e = llm.engine
        return cls(llm.tokenizer, e.vocab_size, e.max_model_len, e.kv.num_pages, e.config.page_size, e.config.stride)

    @property
    def pool_tokens(self) -> int:
        """What one request may hold in the pool (worst case: prompt + output + one verify chunk past the end)."""
        return self.num_pages * self.page_size - self.stride

    def make_request(self, ids, params) -> Request:
        return check_request(ids, params, self.tokenizer, self.vocab_size)


@dataclass
class Delta:
    """What one request gained in one step: final token ids (their log-probs when asked), and on its last delta
    the finished ``RequestOutput``."""

    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    output: RequestOutput | None = None


@dataclass
class StepMessage:
    """One step's news: (request id, delta) pairs; the step's wall time and the step loop's CPU time so far
    (None when no step ran); now and then a snapshot of the engine's state for /metrics."""

    deltas: list[tuple[int, Delta]] = field(default_factory=list)
    step_seconds: float | None = None
    loop_cpu: float = 0.0
    snapshot: dict | None = None


def engine_snapshot(llm: LLM) -> dict:
    """The engine's state as /metrics shows it (``ServerMetrics.observe``), read between steps."""
    sched = llm.engine.scheduler
    alloc = sched.allocator
    s = llm.stats()
    return {"running": len(sched.running), "waiting": len(sched.waiting), "swapped": len(sched.swapped),
            "pages_total": alloc.num_blocks, "pages_used": alloc.num_blocks - alloc.num_free,
            **{k: s[k] for k in ("steps", "stride", "mean_accepted", "mean_k", "per_position_acceptance_all",
                                 "cycles_by_k", "capture_seconds", "compile_seconds")}}


class StepOutputs:
    """Per live request, how many of its output tokens went out; after a step, the new ones as deltas, each under
    the request's key: the id of the HTTP side's ``Request`` (in a child process the engine's own ``Request`` has
    an id of its own, the child's warm-up having used the first ones)."""

    def __init__(self, llm: LLM, stream_interval: int, refresh_s: float = 0.5) -> None:
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
            raise ValueError(f"stream_interval must be an int >= 1 (tokens per streamed chunk), got {stream_interval!r}")
        self.llm = llm
        # A running request's tokens go out once this many are final (its first token and its end at once): fewer,
        # larger chunks for the event loop, which costs 69-90 us of CPU per chunk (the HTTP side, measured on CPU).
        self.stream_interval = stream_interval
        self.refresh_s = refresh_s  # the engine's state is sampled at most this often (and when it goes idle)
        self.live: dict[int, Request] = {}  # key -> request
        self._key: dict[int, int] = {}  # the engine's request id -> key
        self._sent: dict[int, int] = {}  # key -> output tokens sent
        self._last_snapshot = 0.0

    def add(self, r: Request, key: int | None = None) -> None:
        key = r.request_id if key is None else key
        self.live[key] = r
        self._key[r.request_id] = key
        self._sent[key] = 0

    def after_step(self, finished: list[Request], step_seconds: float) -> StepMessage:
        msg = StepMessage(self._deltas(finished), step_seconds, time.thread_time())
        msg.snapshot = self.snapshot(force=not self.llm.engine.has_unfinished())
        return msg

    def snapshot(self, force: bool = False) -> dict | None:
        now = time.monotonic()
        if not force and now - self._last_snapshot < self.refresh_s:
            return None
        self._last_snapshot = now
        return engine_snapshot(self.llm)

    def _deltas(self, finished: list[Request]) -> list[tuple[int, Delta]]:
        out: list[tuple[int, Delta]] = []
        for r in finished:
            key = self._key.pop(r.request_id, None)
            if key is None:
                continue
            del self.live[key]
            sent = self._sent.pop(key)
            o = self.llm.output(r)
            lps = o.logprobs[sent:] if o.logprobs is not None else None
            out.append((key, Delta(o.token_ids[sent:], lps, o)))
        for key, r in self.live.items():
            if r.is_finished:
                continue  # its last tokens come with its output (a stop string may cut them)
            sent = self._sent[key]
            final = len(r.output_token_ids) - r.num_pending
            if final - sent >= self.stream_interval or (sent == 0 and final > 0):
                lps = r.output_logprobs[sent:final] if r.params.logprobs is not None else None
                out.append((key, Delta(r.output_token_ids[sent:final], lps)))
                self._sent[key] = final
        return out


__all__ = ["Delta", "ModelInfo", "StepMessage", "StepOutputs", "engine_snapshot"]
