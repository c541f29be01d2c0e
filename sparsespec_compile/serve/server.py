"""Start-up: the warm-up (run where the step loop runs), and uvicorn (loopback unless told otherwise)."""

from __future__ import annotations

from sparsespec_compile.runtime.llm import LLM
from sparsespec_compile.runtime.sampling_params import SamplingParams


def warm_up(llm: LLM, tokens: int | None = None) -> None:
    """Run short requests through every kind of step — prefill, drafts, verifies (speculating, whatever the
    speculation gate would choose: ``LLM.warming_up``), and a prefill chunk beside drafting rows (a third request
    joins once the first two speculate: an eager step whose kernel variants would otherwise first compile under a
    client's request) — so Dynamo's compiles, the kernels' and the CUDA-graph captures happen before the first client
    waits on them; then zero the statistics. A warm-up request that fails raises."""
    k = llm.config.stride
    params = SamplingParams(max_tokens=tokens or 2 * (k + 2) + 2, ignore_eos=True)
    first = [[1 + i % 7 for i in range(13)], [2 + i % 5 for i in range(29)]]
    late = [3 + i % 11 for i in range(37)]
    with llm.warming_up():
        reqs = [llm.make_request(p, params) for p in first]
        for r in reqs:
            llm.engine.add_request(r)
        for _ in range(k + 2):  # both prompts prefilled and drafting (or decoding, at stride 0)
            llm.step()
        reqs.append(llm.make_request(late, params))
        llm.engine.add_request(reqs[-1])
        while llm.engine.has_unfinished():
            llm.step()
    failed = [r.finish_reason for r in reqs if (r.finish_reason or "").startswith("error")]
    if failed:
        raise RuntimeError(f"the warm-up failed: {failed[0]}")
    llm.stats(reset=True)


def serve(engine, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Serve ``engine`` (engine_base.py; started, warmed up) until interrupted (Ctrl-C / SIGTERM: uvicorn finishes,
    the engine aborts what is left)."""
    import uvicorn

    from .app import engine_app

    app = engine_app(engine, model_name=model_name, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["serve", "warm_up"]
