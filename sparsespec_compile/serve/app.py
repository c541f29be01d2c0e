"""The FastAPI app: ``/v1/completions``, ``/v1/chat/completions`` (whole or streamed as server-sent events),
``/v1/models``, ``/health``, ``/metrics``.

A handler checks and tokenizes its request (a bad one is a 400 here, before the engine sees it), hands the
``Request`` to the engine (engine_base.py: a thread of this process, or a child process) and reads its deltas; it
never runs a step. A client that goes
away — mid-stream, or while waiting for a whole response — leaves its ``async with`` block, which aborts the request
and frees its KV pages at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sparsespec_compile.runtime.llm import LLM
from sparsespec_compile.runtime.prompts import chat_ids

from .async_engine import AsyncEngine
from .engine_base import EngineBase, EngineDead, RequestStream
from .detokenize import IncrementalText
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, RequestError, check_length, parse,
                       requested_max_tokens, sampling_params)
from .responses import Envelope, LogprobFormatter, finish_reason, sse, usage

log = logging.getLogger("sparsespec.serve")

_PARAM_OF_SAMPLING_ERROR = "SamplingParams."


def _param_of(exc: ValueError) -> str | None:
    """The field a ``SamplingParams`` ValueError names (its message starts ``SamplingParams.<field>``)."""
    msg = str(exc)
    if msg.startswith(_PARAM_OF_SAMPLING_ERROR):
        return msg[len(_PARAM_OF_SAMPLING_ERROR):].split(" ", 1)[0]
    return None


class Server:
    """What the routes share: the engine, what it says about the model, the metrics, the served name."""

    def __init__(self, engine: EngineBase, model_name: str, api_key: str | None) -> None:
        if engine.info.tokenizer is None:
            raise ValueError("serving needs the model's tokenizer (text in, text out): LLM(model, tokenizer=...)")
        self.engine, self.info, self.model_name, self.api_key = engine, engine.info, model_name, api_key
        self.tokenizer = engine.info.tokenizer
        self.metrics = ServerMetrics(model_name)
        engine.metrics = self.metrics
        self.metrics.engine_in_process.set(int(engine.in_process))
        self.context = engine.info.max_model_len
        self.pool_tokens = engine.info.pool_tokens
        self.created = int(time.time())

    # ---- request checks -------------------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise RequestError(f"The model '{name}' does not exist: this server serves '{self.model_name}'", "model",
                               code="model_not_found")

    def build(self, req, prompt, chat: bool):
        """The checked runtime ``Request`` for one prompt (token ids, text, or chat messages)."""
        tok = self.tokenizer
        field = "messages" if chat else "prompt"
        try:
            if chat:
                ids = chat_ids(tok, [{"role": m.role, "content": m.text()} for m in prompt])
            elif isinstance(prompt, str):
                ids = list(tok(prompt)["input_ids"])
            else:
                ids = list(prompt)
        except ValueError as exc:
            raise RequestError(str(exc), field) from None
        if not ids:
            raise RequestError(f"Invalid '{field}': it is empty", field)
        want, max_field = requested_max_tokens(req)
        max_tokens = check_length(len(ids), want, max_field, context=self.context, pool_tokens=self.pool_tokens,
                                  prompt_field=field)
        try:
            params = sampling_params(req, max_tokens)
            return self.info.make_request(ids, params)
        except ValueError as exc:
            raise RequestError(str(exc), _param_of(exc) or field) from None

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError("Incorrect API key provided: send 'Authorization: Bearer <key>'", None, status=401,
                               code="invalid_api_key")


def _completion_prompts(req: CompletionRequest) -> list:
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        return [p]
    if not p:
        raise RequestError("Invalid 'prompt': it is empty", "prompt")
    return list(p)


async def _body(request: Request):
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", None) from None


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


def create_app(llm: LLM, *, model_name: str, api_key: str | None = None, stream_interval: int = 1) -> FastAPI:
    """The app serving ``llm`` under ``model_name`` with its step loop in a thread of this process (async_engine.py),
    running while the app does (lifespan). ``stream_interval``: tokens per streamed chunk (at least; the first token
    goes at once)."""
    return engine_app(AsyncEngine(llm, stream_interval=stream_interval), model_name=model_name, api_key=api_key)


def engine_app(engine: EngineBase, *, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app serving ``engine`` (started and stopped with the app)."""
    server = Server(engine, model_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)

    app = FastAPI(title="sparsespec", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(EngineDead)
    async def _engine_dead(request: Request, exc: EngineDead):
        return JSONResponse(RequestError(str(exc), None, status=503, type="server_error").body(), status_code=503)

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            return JSONResponse({"status": "engine not running", "error": repr(server.engine.error)}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body, ctype = server.metrics.render()
        return Response(body, media_type=ctype)

    def card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "sparsespec",
                "max_model_len": server.context}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        server.check_key(request)
        server.check_model(name)
        return card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_key(request)
        req = parse(CompletionRequest, await _body(request))
        server.check_model(req.model)
        reqs = [server.build(req, p, chat=False) for p in _completion_prompts(req)]
        return await _respond(server, request, req, reqs, Envelope("text", server.model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_key(request)
        req = parse(ChatCompletionRequest, await _body(request))
        server.check_model(req.model)
        reqs = [server.build(req, req.messages, chat=True)]
        return await _respond(server, request, req, reqs, Envelope("chat", server.model_name))

    return app


async def _respond(server: Server, http: Request, req, reqs: list, env: Envelope):
    streams = [server.engine.stream(r) for r in reqs]  # EngineDead (503) before anything is queued
    top = reqs[0].params.logprobs
    fmt = [LogprobFormatter(server.tokenizer, env.chat, top or 0) for _ in reqs]
    if req.stream:
        return StreamingResponse(_stream(server, req, streams, env, fmt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async with contextlib.AsyncExitStack() as stack:
        for s in streams:
            await stack.enter_async_context(s)
        gather = asyncio.gather(*(s.result() for s in streams))
        watch = asyncio.ensure_future(_until_disconnected(http))
        try:
            await asyncio.wait({gather, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not gather.done():  # the client went away: leaving the block aborts every stream
            gather.cancel()
            return Response(status_code=499)
        outs = gather.result()
    failed = [o for o in outs if o.finish_reason.startswith("error")]
    if failed:
        raise RequestError(failed[0].finish_reason, None, status=500, type="server_error")
    choices = [env.choice(i, o.text, finish_reason(o.finish_reason), fmt[i].format(o.token_ids, o.logprobs))
               for i, o in enumerate(outs)]
    return env.body(choices, usage(sum(len(r.prompt_token_ids) for r in reqs), sum(len(o.token_ids) for o in outs)))


async def _merge(streams: list[RequestStream]):
    """(index, delta) of every stream, as they come."""
    if len(streams) == 1:  # the usual case: no pump task and second queue per delta
        async for d in streams[0]:
            yield 0, d
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for d in s:
                await q.put((i, d))
        except BaseException as exc:  # EngineDead, or cancelled with the response
            await q.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, d = await q.get()
            if isinstance(d, BaseException):
                raise d
            yield i, d
            left -= d.output is not None
    finally:
        for t in tasks:
            t.cancel()


async def _stream(server: Server, req, streams: list[RequestStream], env: Envelope, fmt: list[LogprobFormatter]):
    """Server-sent events: one chunk per delta with text or tokens, the finish reason on each choice's last, a usage
    chunk when ``stream_options.include_usage``, then ``[DONE]``."""
    texts = [IncrementalText(server.tokenizer, s.request.params.stop) for s in streams]
    completion_tokens = 0
    async with contextlib.AsyncExitStack() as stack:
        for s in streams:
            await stack.enter_async_context(s)
        if env.chat:
            yield sse(env.body([env.choice(0, None, None, chunk=True, role=True)], None, chunk=True))
        try:
            async for i, d in _merge(streams):
                completion_tokens += len(d.token_ids)
                reason = None
                if d.output is None:
                    text = texts[i].add(d.token_ids)
                elif d.output.finish_reason.startswith("error"):
                    yield sse(RequestError(d.output.finish_reason, None, status=500, type="server_error").body())
                    continue
                else:  # the last tokens' text is the final text's rest (a stop string cut it)
                    text = texts[i].finish(d.output.text)
                    reason = finish_reason(d.output.finish_reason)
                if not text and reason is None and d.logprobs is None:
                    continue  # tokens whose text is held back (a stop string may start there)
                if reason is None and d.logprobs is None:
                    yield env.text_chunk(i, text)
                    continue
                lps = fmt[i].format(d.token_ids, d.logprobs)
                yield sse(env.body([env.choice(i, text, reason, lps, chunk=True)], None, chunk=True))
        except EngineDead as exc:
            yield sse(RequestError(str(exc), None, status=503, type="server_error").body())
    if req.include_usage():
        prompt = sum(s.request.num_prompt_tokens for s in streams)
        yield sse(env.body([], usage(prompt, completion_tokens), chunk=True))
    yield sse("[DONE]")


__all__ = ["Server", "create_app", "engine_app"]
