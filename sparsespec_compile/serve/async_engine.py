"""The step loop in its own thread, fed by the event loop through a thread-safe inbox.

HTTP handlers (the asyncio event loop) never run a step and the step loop never waits on HTTP: a handler puts
``("add", stream)`` or ``("abort", stream)`` into ``_inbox``; the engine thread drains it before every step, so a
request that arrives while others run joins the running batch at the next step (continuous batching), and an
aborted one is finished and its KV pages freed there. After each step the thread hands every stream's new *final*
tokens (never an overlap placeholder still on the device) to the event loop in one ``call_soon_threadsafe``.

If the step loop itself raises (a scheduler invariant broke: a bug, not a bad request, which the runtime confines to
its own request), every live request is finished with the error, the engine is marked dead and ``/health`` says so;
no accepted request is left waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from sparsespec_compile.runtime.llm import LLM, RequestOutput
from sparsespec_compile.runtime.request import Request

log = logging.getLogger("sparsespec.serve")


@dataclass
class Delta:
    """What one request gained in one step: final token ids (their log-probs when asked), and on its last delta
    the finished ``RequestOutput``."""

    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    output: RequestOutput | None = None


class EngineDead(RuntimeError):
    pass


class RequestStream:
    """One request as its handler sees it: ``async for delta in stream``. Used as ``async with``: leaving the block
    before the last delta (the client went away, the handler failed) aborts the request."""

    def __init__(self, engine: "AsyncEngine", request: Request) -> None:
        self.engine, self.request = engine, request
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.arrival = time.monotonic()
        self.sent = 0  # output tokens handed to the event loop (engine thread only)
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


class AsyncEngine:
    """``llm``'s engine driven by one thread. ``start()`` on the event loop that will read the streams."""

    def __init__(self, llm: LLM, metrics=None, *, stream_interval: int = 1, idle_wait_s: float = 0.25) -> None:
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
            raise ValueError(f"stream_interval must be an int >= 1 (tokens per streamed chunk), got {stream_interval!r}")
        self.llm, self.metrics = llm, metrics
        # A running request's tokens go to its handler once this many are final (its first token and its end at
        # once): fewer, larger chunks for the event loop, which shares the interpreter lock with the step loop.
        self.stream_interval = stream_interval
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, RequestStream] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._idle_wait_s = idle_wait_s  # an idle loop wakes this often to refresh the metrics
        # torch's intra-op thread count is per thread: the engine thread gets the one set where the LLM was built
        self._torch_threads = torch.get_num_threads()
        self.error: BaseException | None = None
        # Taken to close the inbox (engine failed or stopped) and to submit: a request submitted while the engine
        # goes away gets the error, never an inbox that nobody reads any more.
        self._lock = threading.Lock()
        self._closed: str | None = None  # why the inbox is closed

    # ---- event loop side --------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sparsespec-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish every live request (aborted), then end the thread."""
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def stream(self, request: Request) -> RequestStream:
        if not self.alive:
            raise EngineDead(f"the engine is not running{f': {self.error}' if self.error else ''}")
        return RequestStream(self, request)

    def submit(self, stream: RequestStream) -> None:
        with self._lock:
            if self._closed is None:
                self._inbox.put(("add", stream))
                return
        stream.queue.put_nowait(EngineDead(self._closed))

    def abort(self, stream: RequestStream) -> None:
        stream.done = True
        self._inbox.put(("abort", stream))

    def _deliver(self, batch: list[tuple[RequestStream, Delta | BaseException]]) -> None:
        for stream, item in batch:
            stream.queue.put_nowait(item)

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self._torch_threads)
        try:
            while not self._stopping:
                busy = self.llm.engine.has_unfinished()
                self._drain(block=not busy)
                if self._stopping:
                    break
                if self.llm.engine.has_unfinished():
                    t0 = time.perf_counter()
                    finished = self.llm.step()
                    if self.metrics is not None:
                        self.metrics.step_done(time.perf_counter() - t0)
                    self._publish(finished)
                    if self.metrics is not None:  # sampled now and then; at once when the engine goes idle
                        self.metrics.observe_engine(self.llm, force=not self.llm.engine.has_unfinished())
                elif self.metrics is not None:
                    self.metrics.observe_engine(self.llm)
        except BaseException as exc:  # a broken invariant: fail everyone rather than leave them waiting
            log.exception("the engine loop failed; every live request is finished with the error")
            self.error = exc
            self._close(f"the engine failed: {exc!r}")
            return
        for s in self._live.values():  # shutting down: the handlers get an error, not silence
            self.llm.abort(s.request)
        self._close("the server is shutting down")

    def _close(self, why: str) -> None:
        """Fail every live request and every one still in the inbox with ``why``; later submits fail at once."""
        with self._lock:
            self._closed = why
            queued = []
            while True:
                try:
                    kind, stream = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    queued.append(stream)
        self._send([(s, EngineDead(why)) for s in [*self._live.values(), *queued]])
        self._live.clear()

    def _drain(self, block: bool) -> None:
        """Apply what the handlers sent since the last step (waits for something when the engine is idle)."""
        try:
            item = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, stream = item
            if kind == "add":
                if stream.done:  # aborted before it was ever queued
                    pass
                else:
                    self._live[stream.request.request_id] = stream
                    self.llm.engine.add_request(stream.request)  # refused ones finish at the next step, with why
                    if self.metrics is not None:
                        self.metrics.prompt_tokens.inc(stream.request.num_prompt_tokens)
            elif kind == "abort":
                if stream.request.request_id in self._live and not stream.request.is_finished:
                    self.llm.abort(stream.request)  # pages freed now; reported finished by the next step
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _publish(self, finished: list[Request]) -> None:
        now = time.monotonic()
        batch: list[tuple[RequestStream, Delta | BaseException]] = []
        for r in finished:
            s = self._live.pop(r.request_id, None)
            if s is None:
                continue
            out = self.llm.output(r)
            ids = out.token_ids[s.sent:]
            lps = out.logprobs[s.sent:] if out.logprobs is not None else None
            self._timing(s, len(ids), now, final=True)
            batch.append((s, Delta(ids, lps, out)))
        for s in self._live.values():
            r = s.request
            if r.is_finished:
                continue  # its last tokens come with its output (a stop string may cut them)
            final = len(r.output_token_ids) - r.num_pending
            if final - s.sent >= self.stream_interval or (s.sent == 0 and final > 0):
                lps = r.output_logprobs[s.sent:final] if r.params.logprobs is not None else None
                batch.append((s, Delta(r.output_token_ids[s.sent:final], lps)))
                self._timing(s, final - s.sent, now)
                s.sent = final
        if batch:
            self._send(batch)

    def _timing(self, s: RequestStream, n: int, now: float, final: bool = False) -> None:
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
        if final and m is not None:
            m.e2e_latency.observe(now - s.arrival)
            m.finished(s.request.finish_reason or "")

    def _send(self, batch) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:  # the event loop is closed: nobody is reading any more
            pass


__all__ = ["AsyncEngine", "Delta", "EngineDead", "RequestStream"]
