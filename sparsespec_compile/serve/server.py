"""Start-up: warm the engine, then serve it with uvicorn (loopback unless told otherwise)."""

from __future__ import annotations

import logging

from sparsespec_compile.runtime.llm import LLM
from sparsespec_compile.runtime.sampling_params import SamplingParams

log = logging.getLogger("sparsespec.serve")


def warm_up(llm: LLM, tokens: int | None = None) -> None:
    """Run two short requests through every kind of step (prefill, drafts, verifies: speculating, whatever the
    speculation gate would choose) so Dynamo's compiles and the CUDA-graph captures happen before the first client
    waits on them; then zero the statistics."""
    k = llm.config.stride
    n = tokens or 2 * (k + 2) + 2
    prompt = [[1 + i % 7 for i in range(13)], [2 + i % 5 for i in range(29)]]
    with llm.warming_up():
        llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False)
    llm.stats(reset=True)


def serve(llm: LLM, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          warmup: bool = True, stream_interval: int = 1, log_level: str = "info") -> None:
    """Serve ``llm`` until interrupted (Ctrl-C / SIGTERM: uvicorn finishes, the engine thread aborts what is left)."""
    import uvicorn

    from .app import create_app

    if warmup:
        log.info("warming up (compiles the step graphs)")
        warm_up(llm)
    app = create_app(llm, model_name=model_name, api_key=api_key, stream_interval=stream_interval)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["serve", "warm_up"]
