"""The step loop in a thread of the server's own process, fed by the event loop through a thread-safe inbox (what
``create_app(llm)`` uses: the tests look at the LLM behind the HTTP API).

HTTP handlers (the asyncio event loop) never run a step and the step loop never waits on HTTP: a handler puts
``("add", request)`` or ``("abort", request id)`` into ``_inbox``; the engine thread drains it before every step, so
a request that arrives while others run joins the running batch at the next step (continuous batching), and an
aborted one is finished and its KV pages freed there. After each step the thread hands every stream its new *final*
tokens (never an overlap placeholder still on the device) through ``dispatch``.

Both sides share one interpreter lock: on an H200 this reached 0.20x offline ``LLM.generate`` tokens/s with 256
streaming clients at --stream-interval 1; ``sparsespec serve`` runs the step loop in a child process instead
(process_engine.py).

If the step loop itself raises (a scheduler invariant broke: a bug, not a bad request, which the runtime confines to
its own request), every live request is finished with the error, the engine is marked dead and ``/health`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

import torch

from sparsespec_compile.runtime.llm import LLM

from .engine_base import EngineBase
from .step_output import ModelInfo, StepOutputs

log = logging.getLogger("sparsespec.serve")


class AsyncEngine(EngineBase):
    """``llm``'s engine driven by one thread. ``start()`` on the event loop that will read the streams."""

    def __init__(self, llm: LLM, *, stream_interval: int = 1, idle_wait_s: float = 0.25) -> None:
        super().__init__(ModelInfo.of(llm))
        self.llm = llm
        self.outputs = StepOutputs(llm, stream_interval)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._idle_wait_s = idle_wait_s  # an idle loop wakes this often to refresh the metrics
        # torch's intra-op thread count is per thread: the engine thread gets the one set where the LLM was built
        self._torch_threads = torch.get_num_threads()

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

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self._torch_threads)
        engine = self.llm.engine
        try:
            while not self._stopping:
                self._drain(block=not engine.has_unfinished())
                if self._stopping:
                    break
                if engine.has_unfinished():
                    t0 = time.perf_counter()
                    finished = self.llm.step()
                    self.dispatch(self.outputs.after_step(finished, time.perf_counter() - t0))
                elif self.metrics is not None and (snap := self.outputs.snapshot()) is not None:
                    self.metrics.observe(snap)
        except BaseException as exc:  # a broken invariant: fail everyone rather than leave them waiting
            log.exception("the engine loop failed; every live request is finished with the error")
            self.error = exc
            self.close(f"the engine failed: {exc!r}")
            return
        for r in self.outputs.live.values():  # shutting down: the handlers get an error, not silence
            self.llm.abort(r)
        self.close("the server is shutting down")

    def _drain(self, block: bool) -> None:
        """Apply what the handlers sent since the last step (waits for something when the engine is idle)."""
        try:
            item = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, what = item
            if kind == "add":
                self.outputs.add(what)
                self.llm.engine.add_request(what)  # refused ones finish at the next step, with why
            elif kind == "abort":
                r = self.outputs.live.get(what)
                if r is not None and not r.is_finished:
                    self.llm.abort(r)  # pages freed now; reported finished by the next step
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return


__all__ = ["AsyncEngine"]
