"""``sparsespec serve``: an OpenAI-compatible HTTP server over the speculative runtime (FastAPI + uvicorn).

    protocol.py      request bodies, checked; RequestError -> the OpenAI error JSON
    async_engine.py  the step loop in its own thread, continuous batching, aborts
    detokenize.py    incremental text of a stream (on the event loop)
    responses.py     response bodies and server-sent-event chunks
    metrics.py       /metrics (prometheus-client)
    app.py           the routes
    server.py        warm-up and uvicorn

Needs the ``serve`` extra: ``pip install "sparsespec[serve]"``.
"""

from __future__ import annotations

from .app import create_app
from .server import serve, warm_up

__all__ = ["create_app", "serve", "warm_up"]
