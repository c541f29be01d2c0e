"""The step loop in a child process (what ``sparsespec serve`` runs), as vLLM V1's EngineCore and SGLang's scheduler.

In one interpreter the HTTP side (69-90 us of CPU per streamed chunk, measured on CPU) and the step loop share the
interpreter lock: on an H200 with 256 streaming clients the server's step loop ran 26 steps/s against ~130 offline
(0.20x offline tokens/s). Here the child (engine_core.py, a "spawn" context: CUDA cannot be forked) builds the LLM
from a picklable ``build``, warms it up and sends the ``ModelInfo`` the HTTP side needs (tokenizer, lengths); then the
event loop sends it adds and aborts over a pipe, and a reader thread here receives one ``StepMessage`` per step and
dispatches it (the reader waits in ``recv`` without the lock; only unpickling and dispatching hold it).

A child that dies (a crash, the OOM killer) ends the reader's ``recv``: every live request fails with
``EngineDead`` and ``/health`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading

import torch

from . import engine_core
from .engine_base import EngineBase, EngineDead
from .step_output import StepMessage

log = logging.getLogger("sparsespec.serve")


class ProcessEngine(EngineBase):
    """Starts the child and waits until it is ready (the model built and warmed up: ``EngineDead`` if it fails).
    ``start()`` on the event loop that will read the streams."""

    in_process = False

    def __init__(self, build, *, stream_interval: int = 1, warmup: bool = True) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # torch's intra-op thread count is per process: the child gets this one's (as the thread engine does)
        self.process = ctx.Process(target=engine_core.main, name="sparsespec-engine",
                                   args=(child, build, stream_interval, warmup, torch.get_num_threads()))
        self.process.start()
        child.close()  # ours closed: the child's end of file is the pipe's, so its death ends our recv
        try:
            kind, what = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise EngineDead(f"the engine process died while starting (exit code {self.process.exitcode})") from None
        if kind != "ready":
            self.process.join(5)
            raise EngineDead(f"the engine process failed to start:\n{what}")
        super().__init__(what)
        self._send_lock = threading.Lock()  # the event loop and stop() both send
        self._reader: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="sparsespec-engine-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the child (live requests fail: the server is shutting down)."""
        self._stopping = True
        self._send(("stop", None))
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("the engine process did not stop in %.0f s: terminated", timeout)
            self.process.terminate()
            self.process.join(5)
        if self._reader is not None:
            self._reader.join(timeout)
        self.close("the server is shutting down")

    def _running(self) -> bool:
        return self.process.is_alive() and self._reader is not None and self._reader.is_alive()

    def _send(self, message: tuple) -> None:
        kind, what = message
        if kind == "add":  # the ids and params, not the Request: its stop-string matcher holds the tokenizer
            message = (kind, (what.prompt_token_ids, what.params, what.request_id))
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the child is gone: the reader, at the pipe's end of file, fails every live request
            pass

    def _read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if isinstance(msg, StepMessage):
                    self.dispatch(msg)
                else:
                    kind, why = msg
                    raise EngineDead(why if kind == "error" else f"unexpected message {kind!r} from the engine")
        except (EOFError, OSError):
            if self._stopping:
                return
            self.process.join(5)
            self.error = EngineDead(f"the engine process died (exit code {self.process.exitcode})")
        except EngineDead as exc:
            self.error = exc
        log.error("%s; every live request is finished with the error", self.error)
        self.close(str(self.error))


__all__ = ["ProcessEngine"]
