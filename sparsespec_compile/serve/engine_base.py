"""What the HTTP side sees of an engine, whichever runs the step loop (a thread: async_engine.py; a child process:
process_engine.py): ``stream(request)`` -> a ``RequestStream`` to read deltas from, ``submit`` / ``abort``,
``alive`` / ``error`` for /health, ``start`` / ``stop``.

An engine calls ``dispatch`` with each ``StepMessage`` on the thread that hears from the step loop (the engine thread
itself, or the process engine's reader thread): it updates the metrics and hands every stream its delta on the event
loop in one ``call_soon_threadsafe``. ``close(why)`` fails every live request with ``EngineDead(why)``; later submits
fail at once, so no accepted request is left waiting forever.
"""

from __future__ import annotations

import abc
import asyncio
import threading
import time

from sparsespec_compile.runtime.llm import RequestOutput
from sparsespec_compile.runtime.request import Request

from .step_output import Delta, ModelInfo, StepMessage


class EngineDead(RuntimeError):
    pass


class RequestStream:
    """One request as its handler sees it: ``async for delta in stream``. Used as ``async with``: leaving the block
    before the last delta (the client went away, the handler failed) aborts the request."""

    def __init__(self, engine: "EngineBase", request: Request) -> None:
        self.engine, self.request = engine, request
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.done = False

    async def __aenter__(self) -> "RequestStream":
        self.engine.submit(self)
        return self

    async def __aexit__(self, *exc) -> None:
        if not self.done:
            self.engine.abort(self)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self.done:
            raise StopAsyncIteration
        item = await self.queue.get()
        # Steps that piled up while this handler waited (the event loop behind the step loop, e.g. with hundreds
        # of clients) are merged into one delta: one chunk to encode and send instead of one per step.
        while isinstance(item, Delta) and item.output is None and not self.queue.empty():
            nxt = self.queue.get_nowait()
            if isinstance(nxt, BaseException):
                self.queue.put_nowait(nxt)  # (put back: nothing else is queued after an error)
                break
            lps = None if item.logprobs is None else item.logprobs + (nxt.logprobs or [])
            item = Delta(item.token_ids + nxt.token_ids, lps, nxt.output)
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item.output is not None:
            self.done = True
        return item

    async def result(self) -> RequestOutput:
        """Wait for the end: the finished output."""
        async for d in self:
            if d.output is not None:
                return d.output
        raise AssertionError("stream ended without an output")


class EngineBase(abc.ABC):
    """The HTTP side's half of an engine. Subclasses send ``("add", request)`` / ``("abort", request id)`` to their
    step loop (``_send``) and say whether it runs (``_running``)."""

    in_process = True  # the step loop is a thread of this process

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.metrics = None  # the app's ServerMetrics, set before start()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live: dict[int, RequestStream] = {}  # request id -> stream, from submit to its last delta
        # Taken to submit and to close: a request submitted while the engine goes away gets the error, never a
        # step loop that nobody runs any more.
        self._lock = threading.Lock()
        self._closed: str | None = None  # why no more requests are taken

    # ---- event loop side --------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.error is None and self._closed is None and self._running()

    def stream(self, request: Request) -> RequestStream:
        if not self.alive:
            raise EngineDead(f"the engine is not running{f': {self.error}' if self.error else ''}")
        return RequestStream(self, request)

    def submit(self, stream: RequestStream) -> None:
        with self._lock:
            if self._closed is None:
                self._live[stream.request.request_id] = stream
                self._send(("add", stream.request))
                if self.metrics is not None:
                    self.metrics.prompt_tokens.inc(stream.request.num_prompt_tokens)
                return
        stream.queue.put_nowait(EngineDead(self._closed))

    def abort(self, stream: RequestStream) -> None:
        """Finish the request (its KV pages freed at the step loop's next drain); it is reported finished ("abort")."""
        stream.done = True
        with self._lock:
            if self._closed is None:
                self._send(("abort", stream.request.request_id))

    @staticmethod
    def _deliver(batch: list[tuple[RequestStream, Delta | BaseException]]) -> None:
        for stream, item in batch:
            stream.queue.put_nowait(item)

    # ---- the thread that hears from the step loop ---------------------------------------------------------------
    def dispatch(self, msg: StepMessage) -> None:
        m = self.metrics
        if m is not None and msg.step_seconds is not None:
            m.step_done(msg.step_seconds, msg.loop_cpu)
        now = time.monotonic()
        batch = []
        for rid, delta in msg.deltas:
            s = self._live.get(rid) if delta.output is None else self._live.pop(rid, None)
            if s is not None:
                self._timing(s, len(delta.token_ids), now, delta.output.finish_reason if delta.output else None)
                batch.append((s, delta))
        if m is not None and msg.snapshot is not None:  # after the tokens: tokens/s counts this step's
            m.observe(msg.snapshot)
        if batch:
            self._call(batch)

    def close(self, why: str) -> None:
        """Fail every live request with ``EngineDead(why)``; later submits fail at once."""
        with self._lock:
            self._closed = why
            live, self._live = list(self._live.values()), {}
        self._call([(s, EngineDead(why)) for s in live])

    def _timing(self, s: RequestStream, n: int, now: float, finish_reason: str | None) -> None:
        """``finish_reason``: on a request's last delta (the HTTP side's ``Request`` copy never learns it)."""
        m = self.metrics
        if m is not None and n:
            m.add_generation_tokens(n)
            if s.first_token_at is None:
                m.time_to_first_token.observe(now - s.arrival)
            else:
                m.inter_token_latency.observe(now - s.last_token_at)  # per chunk: a verify may bring several
        if n:
            s.first_token_at = s.first_token_at or now
            s.last_token_at = now
        if finish_reason is not None and m is not None:
            m.e2e_latency.observe(now - s.arrival)
            m.finished(finish_reason)

    def _call(self, batch) -> None:
        if not batch or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:  # the event loop is closed: nobody is reading any more
            pass

    # ---- what each engine provides --------------------------------------------------------------------------------
    @abc.abstractmethod
    def _send(self, message: tuple) -> None:
        """Hand ``message`` to the step loop (a queue for the thread engine, the pipe for the process engine)."""

    @abc.abstractmethod
    def _running(self) -> bool:
        """Whether the step loop still runs."""


__all__ = ["EngineBase", "EngineDead", "RequestStream"]
