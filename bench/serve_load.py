"""Serving throughput and latency: ``sparsespec serve`` under N concurrent streaming clients (the openai client's async
API) against ``LLM.generate`` offline on the same requests (issue 17's target: server tokens/s >= 0.9x offline).

1. starts ``sparsespec serve [MODEL_DIR] SERVE_FLAGS`` as a subprocess (its own process: the load generator's event
   loop does not share the server's interpreter) and waits for ``/health``;
2. sends ``--num-requests`` chat requests (GSM8K questions from ``--prompts``, ``max_tokens`` each, EOS ignored so
   every request is the same length), at most ``--concurrency`` in flight, all streamed, from ``--client-procs``
   processes; records per request the time to first token, the gaps between chunks (ITL) and the time per output
   token after the first (TPOT); and, to tell which side is the limit, each client process's CPU time and the
   server's own counters over the load (its engine's steps/s and time per step, the HTTP side's CPU per chunk);
3. stops the server, builds the same ``LLM`` in this process (``cli.load_served`` with the same flags), warms it up as
   the server did, and times ``LLM.generate`` on the same prompts and parameters.

Writes ``serve_load.json`` (and the server's log) under ``--out``. Everything after ``--`` goes to ``sparsespec
serve`` (and so to the offline LLM). The H200 target (``bench/serve_device.sh`` runs it on the device machine):

    python bench/serve_load.py --prompts ../shared/data/prompts/gsm8k_test.jsonl --num-requests 256 --concurrency 256 \\
        --max-tokens 1024 --out bench_out/serve -- --max-num-seqs 256

On a CPU, a tiny model in seconds (tests/test_serve_load.py):

    python bench/serve_load.py --model-dir DIR --prompts p.jsonl --num-requests 4 --max-tokens 8 --out /tmp/s \\
        -- --compiler eager --stride 4 --num-pages 64 --max-num-seqs 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def load_prompts(path: str, n: int) -> list[str]:
    """``n`` prompts from a jsonl (field ``question``, ``prompt`` or ``problem``), cycled if the file has fewer."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                rows.append(next(d[k] for k in ("question", "prompt", "problem") if k in d))
    if not rows:
        raise SystemExit(f"serve_load: no prompts in {path}")
    return [rows[i % len(rows)] for i in range(n)]


def percentiles(xs: list[float], scale: float = 1e3) -> dict:
    if not xs:
        return {}
    s = sorted(xs)

    def q(p):
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] * scale

    return {"mean": statistics.fmean(s) * scale, "p50": q(50), "p90": q(90), "p95": q(95), "p99": q(99),
            "max": s[-1] * scale, "n": len(s)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str | None, serve_args: list[str], port: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sparsespec_compile.cli", "serve", *([model_dir] if model_dir else []),
           "--port", str(port), "--served-model-name", "bench", "--log-level", "warning", *serve_args]
    log = open(log_path, "w")
    print("serve_load:", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float, log_path: Path) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"serve_load: the server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if _get(f"{base}/health")[0] == 200:
                return time.monotonic() - t0
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"serve_load: the server was not healthy after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # uvicorn's graceful shutdown; its own process group only
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def client_requests(base: str, prompts: list[str], args, concurrency: int) -> list:
    """Stream every prompt through the openai client's async API, at most ``concurrency`` at once: per request its
    start, the arrival time of each chunk with text (or the finish reason), its completion tokens; or the error."""
    import openai

    # (the client's own connection pool holds up to 1,000 connections: enough for every client at once)
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=args.request_timeout)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> dict:
        async with gate:
            t0 = time.monotonic()
            chunks, tokens, reason = [], 0, None
            stream = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                temperature=args.temperature, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            async for ch in stream:
                if ch.usage is not None:
                    tokens = ch.usage.completion_tokens
                if ch.choices and (ch.choices[0].delta.content or ch.choices[0].finish_reason):
                    chunks.append(time.monotonic())
                    reason = ch.choices[0].finish_reason or reason
            return {"start": t0, "chunks": chunks, "tokens": tokens, "finish_reason": reason}

    results = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
    await client.close()
    return [r if isinstance(r, dict) else repr(r) for r in results]


def client_worker() -> int:
    """One client process (``--client-worker``): reads its job (one JSON line) from stdin, says ``ready`` once
    imported, starts on ``go``, prints its results (and its own CPU time over the load) as one JSON line."""
    import openai  # noqa: F401  (imported before "ready": the processes start the load together)

    job = json.loads(sys.stdin.readline())
    args = argparse.Namespace(**job["args"])
    print("ready", flush=True)
    sys.stdin.readline()
    t0, c0 = time.monotonic(), time.process_time()
    results = asyncio.run(client_requests(job["base"], job["prompts"], args, job["concurrency"]))
    print(json.dumps({"results": results, "start": t0, "end": time.monotonic(),
                      "cpu_s": time.process_time() - c0}), flush=True)
    return 0


def run_load(base: str, prompts: list[str], args) -> dict:
    """The clients in ``args.client_procs`` processes (prompts dealt round-robin, concurrency split between them):
    one Python process parsing a few thousand chunks/s through the openai client is itself the limit (measured on a
    2-core CPU: 220 us of client CPU per chunk, 4,400 chunks/s at most, against a server that only sends)."""
    procs = max(1, min(args.client_procs, args.concurrency, len(prompts)))
    part = {k: getattr(args, k) for k in ("max_tokens", "temperature", "request_timeout")}
    workers = []
    try:
        for i in range(procs):
            w = subprocess.Popen([sys.executable, __file__, "--client-worker"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            workers.append(w)
            conc = args.concurrency // procs + (i < args.concurrency % procs)
            w.stdin.write(json.dumps({"base": base, "prompts": prompts[i::procs], "concurrency": conc,
                                      "args": part}) + "\n")
            w.stdin.flush()
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise SystemExit(f"serve_load: a client process failed to start (exit {w.wait()})")
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        done = []
        for w in workers:
            line = w.stdout.readline()
            if w.wait() != 0 or not line:
                raise SystemExit(f"serve_load: a client process failed (exit {w.returncode})")
            done.append(json.loads(line))
    finally:
        for w in workers:  # the others, when one failed
            if w.poll() is None:
                w.kill()
                w.wait()
    wall = max(d["end"] for d in done) - min(d["start"] for d in done)
    results = [r for d in done for r in d["results"]]
    ok = [r for r in results if isinstance(r, dict) and r["chunks"]]
    errors = [r for r in results if not isinstance(r, dict)]
    ttft = [r["chunks"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    tpot = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in ok)
    chunks = sum(len(r["chunks"]) for r in ok)
    cpu = [d["cpu_s"] for d in done]
    busiest = max(cpu) / wall if wall else 0.0
    # A client process near 1.0 CPU/wall is the limit, not the server (then add --client-procs): 0.9 leaves room
    # for the waits on the socket that even a saturated asyncio loop has.
    client = {"procs": procs, "chunks": chunks, "chunks_per_s": chunks / wall if wall else 0.0,
              "cpu_per_wall_max": busiest, "cpu_us_per_chunk": sum(cpu) / chunks * 1e6 if chunks else 0.0,
              "bound": "client" if busiest >= 0.9 else "server"}
    return {"requests": len(prompts), "completed": len(ok), "errors": errors[:5], "num_errors": len(errors),
            "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl), "tpot_ms": percentiles(tpot),
            "e2e_s": percentiles([r["chunks"][-1] - r["start"] for r in ok], scale=1.0),
            "finish_reasons": sorted({r["finish_reason"] for r in ok if r["finish_reason"]}), "client": client}


def scrape(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(_get(f"{base}/metrics")[1]):
        for s in fam.samples:
            if s.name.endswith(("_bucket", "_created")):
                continue
            extra = {k: v for k, v in s.labels.items() if k != "model_name"}
            key = s.name + "".join(f"[{k}={v}]" for k, v in sorted(extra.items()))
            out[key] = s.value
    return out


def server_window(before: dict, after: dict, wall: float, chunks: int) -> dict:
    """What the server's own counters say about the load window: its engine's steps/s and time per step (next to
    the offline run's, the step loop's slow-down from sharing the process with the event loop), how much of the
    window the step loop spent in steps, and the CPU the rest of the server (HTTP, SSE, detokenizing) spent per
    chunk."""
    def d(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    steps, step_s = d("sparsespec_engine_steps_run_total"), d("sparsespec_engine_step_seconds_total")
    engine_cpu, cpu = d("sparsespec_engine_thread_cpu_seconds"), d("process_cpu_seconds_total")
    # process_cpu_seconds_total is the server process's: the step loop's CPU is in it only when it is a thread there
    http_cpu = cpu - engine_cpu * after.get("sparsespec_engine_in_server_process", 1.0)
    return {"tokens_per_s": d("sparsespec_generation_tokens_total") / wall, "engine_steps": steps,
            "engine_steps_per_s": steps / wall, "engine_step_ms": step_s / steps * 1e3 if steps else 0.0,
            "engine_step_busy": step_s / wall, "engine_cpu_per_wall": engine_cpu / wall,
            "process_cpu_per_wall": cpu / wall,
            "http_cpu_us_per_chunk": http_cpu / chunks * 1e6 if chunks else 0.0,
            "engine_capture_s": d("sparsespec_engine_graph_capture_seconds"),
            "engine_compile_s": d("sparsespec_engine_compile_seconds")}


def run_offline(args, serve_args: list[str], prompts: list[str]) -> dict:
    from sparsespec_compile import SamplingParams, cli
    from sparsespec_compile.serve import warm_up

    ns = cli.build_parser().parse_args(["serve", *([args.model_dir] if args.model_dir else []), *serve_args])
    llm, _ = cli.load_served(ns, cli.serve_config(ns))
    if not ns.no_warmup:
        warm_up(llm)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_chat_template=True, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    s = llm.stats()
    return {"output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "engine_tokens_per_s": s["tokens_per_s"], "compile_seconds": s["compile_seconds"],
            "mean_accepted": s["mean_accepted"], "mean_k": s["mean_k"], "steps": s["steps"],
            "step_ms": wall / s["steps"] * 1e3 if s["steps"] else 0.0,
            "failed": sum(o.finish_reason.startswith("error") for o in outs)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--client-worker"]:
        return client_worker()
    own, serve_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="arguments after -- go to `sparsespec serve` (and the offline LLM)")
    ap.add_argument("--model-dir", default=None, help="Hugging Face model directory (default: the embedded SmolLM2)")
    ap.add_argument("--prompts", default="../shared/data/prompts/gsm8k_test.jsonl", help="jsonl of prompts (question)")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=None, help="clients in flight (default: all requests)")
    ap.add_argument("--max-tokens", type=int, default=1024, help="output tokens per request (EOS ignored)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for the server's /health")
    ap.add_argument("--request-timeout", type=float, default=3600.0)
    ap.add_argument("--skip-offline", action="store_true", help="only the server side")
    ap.add_argument("--server-url", default=None,
                    help="load a server already running there (its model named 'bench') instead of starting one")
    ap.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                    help="processes the clients are spread over (default: half the cores, at most 8: the rest "
                         "for the server)")
    ap.add_argument("--out", default="bench_out/serve", help="directory for serve_load.json and server.log")
    args = ap.parse_args(own)
    if args.client_procs < 1:
        raise SystemExit(f"serve_load: --client-procs {args.client_procs}: must be >= 1")
    args.concurrency = args.concurrency or args.num_requests
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(args.prompts, args.num_requests)
    proc = None
    if args.server_url:
        base = args.server_url.rstrip("/")
    else:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = out / "server.log"
        proc = start_server(args.model_dir, serve_args, port, log_path)
    try:
        startup = wait_healthy(proc, base, args.startup_timeout, log_path) if proc is not None else 0.0
        print(f"serve_load: server up after {startup:.1f} s; {args.num_requests} requests, {args.concurrency} "
              f"concurrent, {args.max_tokens} tokens each", flush=True)
        before = scrape(base)
        server = run_load(base, prompts, args)
        server["startup_s"] = startup
        time.sleep(0.6)  # the server samples its engine's state every 0.5 s
        server["metrics"] = scrape(base)
        server["window"] = server_window(before, server["metrics"], server["wall_s"], server["client"]["chunks"])
    finally:
        if proc is not None:
            stop_server(proc)
    result = {"command": " ".join(["python bench/serve_load.py", *argv]),
              "serve_args": serve_args, "num_requests": args.num_requests, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "temperature": args.temperature, "prompts": args.prompts,
              "server": server}
    if not args.skip_offline:
        result["offline"] = run_offline(args, serve_args, prompts)
        off = result["offline"]["tokens_per_s"]
        result["server_over_offline"] = server["tokens_per_s"] / off if off else None
        step = result["offline"]["step_ms"]
        result["engine_step_slowdown"] = server["window"]["engine_step_ms"] / step if step else None
    (out / "serve_load.json").write_text(json.dumps(result, indent=2))
    line = (f"server {server['tokens_per_s']:.1f} tok/s ({server['completed']}/{server['requests']} completed), "
            f"TTFT p50 {server['ttft_ms'].get('p50', 0):.1f} ms p99 {server['ttft_ms'].get('p99', 0):.1f} ms, "
            f"ITL p50 {server['itl_ms'].get('p50', 0):.1f} ms p99 {server['itl_ms'].get('p99', 0):.1f} ms")
    if "offline" in result:
        line += (f"; offline LLM.generate {result['offline']['tokens_per_s']:.1f} tok/s; "
                 f"server/offline {result['server_over_offline']:.3f}")
    print(line)
    c, w = server["client"], server["window"]
    line = (f"  {c['bound']}-bound: clients in {c['procs']} processes, {c['chunks_per_s']:.0f} chunks/s, busiest at "
            f"{c['cpu_per_wall_max']:.2f} CPU/wall, {c['cpu_us_per_chunk']:.0f} us CPU per chunk; server: "
            f"{w['engine_steps_per_s']:.1f} steps/s, {w['engine_step_ms']:.2f} ms/step")
    if "offline" in result:
        line += f" (offline {result['offline']['step_ms']:.2f})"
    print(line + f", in steps {w['engine_step_busy']:.2f} of the time (graph captures {w['engine_capture_s']:.1f} s, "
                 f"compiles {w['engine_compile_s']:.1f} s), HTTP side {w['http_cpu_us_per_chunk']:.0f} us CPU per chunk")
    print(f"serve_load: wrote {out / 'serve_load.json'}")
    return 0 if server["completed"] == server["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
