"""A live ``sparsespec serve`` app for tests: uvicorn on 127.0.0.1 (a free port) in a thread of this process, so a
test can also look at the engine (pages in use, live requests, its child process) behind the HTTP API."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx


def wait_until(cond, timeout: float = 10.0, poll: float = 0.02) -> None:
    """Poll ``cond()`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(llm, *, model_name: str = "tiny", api_key: str | None = None, warmup: bool = True):
    """Yield ``(base_url, server)`` (``server``: the app's ``Server``) while uvicorn serves ``llm`` (the step loop
    in a thread of this process)."""
    from sparsespec_compile.serve import create_app, warm_up

    if warmup:
        warm_up(llm)
    with serving(create_app(llm, model_name=model_name, api_key=api_key)) as running:
        yield running


@contextlib.contextmanager
def serving(app):
    """Yield ``(base_url, server)`` while uvicorn serves ``app`` in a thread of this process."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield base, app.state.server
    finally:
        server.should_exit = True
        thread.join(15)
