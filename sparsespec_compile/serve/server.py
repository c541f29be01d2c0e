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
    reqs += _walk_batch_sizes(llm)
    failed = [r.finish_reason for r in reqs if (r.finish_reason or "").startswith("error")]
    if failed:
        raise RuntimeError(f"the warm-up failed: {failed[0]}")
    llm.stats(reset=True)


def _walk_batch_sizes(llm: LLM) -> list:
    """Plain decode steps at every batch size up to ``max_num_seqs``: request i of n stops after i + 1 tokens, so the
    batch shrinks by one request a step from n to 1 and every request bucket's decode graph is captured (its kernels
    compiled and tuned) before a client waits on it, as vLLM captures its decode graphs for every batch size at
    start-up. Without it, 256 clients met ~20 new shapes under load: the H200's step loop ran 10.4 ms a step
    against 4.6 offline, with inter-token stalls up to 1.1 s (bench/RESULTS.md). Contexts stay short: a longer
    context's sequence-length bucket is captured when the load first reaches it."""
    n = llm.config.max_num_seqs
    with llm.warming_up(stride=0):
        reqs = [llm.make_request([1 + i % 13, 2, 3, 4], SamplingParams(max_tokens=i + 1, ignore_eos=True))
                for i in range(n)]
        for r in reqs:
            llm.engine.add_request(r)
        while llm.engine.has_unfinished():
            llm.step()
    return reqs


def serve(engine, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Serve ``engine`` (engine_base.py; started, warmed up) until interrupted (Ctrl-C / SIGTERM: uvicorn finishes,
    the engine aborts what is left)."""
    import uvicorn

    from .app import engine_app

    app = engine_app(engine, model_name=model_name, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["serve", "warm_up"]
