"""The step loop of ``ProcessEngine`` (process_engine.py), in the child process: build the LLM, warm it up, say
``("ready", ModelInfo)``, then loop — drain the server's messages (``("add", (ids, params, key))``, ``("abort", key)``
(the key: the server's request id), ``("stop", None)``), step, send one ``StepMessage`` per step.

A failure of the loop is sent as ``("error", why)`` before the process ends; the server process going away (end of
file on the pipe) ends it quietly.
"""

from __future__ import annotations

import logging
import signal
import time
import traceback

import torch

from .server import warm_up
from .step_output import ModelInfo, StepMessage, StepOutputs

log = logging.getLogger("sparsespec.serve")


def main(conn, build, stream_interval: int, warmup: bool, torch_threads: int, idle_wait_s: float = 0.25) -> None:
    """``build()``: the LLM (picklable: the child of a "spawn" context gets it pickled). An idle loop wakes every
    ``idle_wait_s`` to refresh the metrics' snapshot."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server decides
    torch.set_num_threads(torch_threads)
    try:
        llm = build()
        if warmup:
            warm_up(llm)
        info = ModelInfo.of(llm)
        outputs = StepOutputs(llm, stream_interval)
    except BaseException:
        conn.send(("failed", traceback.format_exc()))
        return
    conn.send(("ready", info))
    engine = llm.engine
    try:
        while True:
            if conn.poll(0 if engine.has_unfinished() else idle_wait_s) and not _drain(conn, llm, info, outputs):
                return
            if engine.has_unfinished():
                t0 = time.perf_counter()
                finished = llm.step()
                conn.send(outputs.after_step(finished, time.perf_counter() - t0))
            elif (snap := outputs.snapshot()) is not None:
                conn.send(StepMessage(snapshot=snap))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the server process is gone: nobody to serve
    except BaseException as exc:  # a broken invariant: the server fails every live request with this
        log.exception("the engine loop failed")
        conn.send(("error", f"the engine failed: {exc!r}"))


def _drain(conn, llm, info: ModelInfo, outputs: StepOutputs) -> bool:
    """Apply every message waiting; False on ``stop``."""
    while conn.poll(0):
        kind, what = conn.recv()
        if kind == "add":
            ids, params, key = what
            r = info.make_request(ids, params)  # checked by the server already: the same check, same answer
            outputs.add(r, key)
            llm.engine.add_request(r)  # refused ones finish at the next step, with why
        elif kind == "abort":
            r = outputs.live.get(what)
            if r is not None and not r.is_finished:
                llm.abort(r)  # pages freed now; reported finished by the next step
        elif kind == "stop":
            return False
        else:
            raise ValueError(f"unknown message {kind!r}")
    return True
