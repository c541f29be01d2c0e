"""``sparsespec serve``: an OpenAI-compatible HTTP server over the speculative runtime (FastAPI + uvicorn).

    protocol.py        request bodies, checked; RequestError -> the OpenAI error JSON
    step_output.py     next to the step loop: the model's facts for the HTTP side, each step's deltas, snapshots
    engine_base.py     the HTTP side of an engine: request streams, delivery, failing live requests
    async_engine.py    the step loop in a thread of this process (create_app(llm): the tests)
    process_engine.py  the step loop in a child process (sparsespec serve); engine_core.py: its loop there
    detokenize.py      incremental text of a stream (on the event loop)
    responses.py       response bodies and server-sent-event chunks
    metrics.py         /metrics (prometheus-client)
    app.py             the routes
    server.py          warm-up and uvicorn

Needs the ``serve`` extra: ``pip install "sparsespec[serve]"``.
"""

from __future__ import annotations

from .app import create_app
from .server import serve, warm_up

__all__ = ["create_app", "serve", "warm_up"]
