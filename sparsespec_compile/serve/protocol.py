"""The OpenAI request bodies, checked: a bad field is a ``RequestError`` naming it (HTTP 400, the OpenAI error JSON),
raised before anything reaches the engine, so a malformed request never touches the running batch.

Types and ranges are pydantic's (``Field`` constraints); what pydantic cannot say (``n`` other than 1, a penalty
this runtime does not implement, a prompt longer than the context) is checked in ``sampling_params`` /
``check_length``. vLLM's extensions ``top_k``, ``ignore_eos``, ``stop_token_ids`` are accepted (through the openai
client's ``extra_body``); unknown fields are ignored, as vLLM and OpenAI do.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparsespec_compile.runtime.sampling_params import SamplingParams

# OpenAI's legacy completions default (16 tokens); chat completions default to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class RequestError(Exception):
    """A request the server refuses: ``status`` with ``{"error": {message, type, param, code}}`` as OpenAI sends."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_validation_error(exc: ValidationError) -> RequestError:
    """pydantic's first complaint as OpenAI's 400: ``param`` is the field's path (``messages.0.content``)."""
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    got = f", got {err['input']!r}" if "input" in err and err["type"] != "missing" else ""
    return RequestError(f"Invalid '{param}': {err['msg']}{got}", param)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 = off
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    user: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    # one prompt (text or token ids) or a list of them (one choice each)
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    type: str


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: ResponseFormat | None = None


def parse(model: type[BaseModel], body: object):
    """``model`` from a decoded JSON body, or the ``RequestError`` that names the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _refuse_unsupported(req: _Common) -> None:
    if req.n != 1:
        raise RequestError(f"Invalid 'n': only n = 1 is supported (one choice per prompt), got {req.n}", "n")
    for name, off in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        if getattr(req, name) != off:
            raise RequestError(f"'{name}' is not supported by this server (only {off}): it would change the "
                               "distribution that speculative verification keeps exactly", name)
    if req.logit_bias:
        raise RequestError("'logit_bias' is not supported by this server", "logit_bias")
    if req.min_tokens:
        raise RequestError("'min_tokens' is not supported by this server (only 0)", "min_tokens")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            raise RequestError(f"Invalid 'best_of': only 1 is supported, got {req.best_of}", "best_of")
        if req.echo:
            raise RequestError("'echo' is not supported by this server", "echo")
        if req.suffix:
            raise RequestError("'suffix' is not supported by this server", "suffix")
    else:
        if req.tools:
            raise RequestError("'tools' (function calling) is not supported by this server", "tools")
        if req.response_format is not None and req.response_format.type != "text":
            raise RequestError(f"'response_format' {req.response_format.type!r} is not supported (only 'text')",
                               "response_format.type")


def requested_max_tokens(req: _Common) -> tuple[int | None, str]:
    """(max_tokens the client asked for or None, the field that said it)."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens, "max_completion_tokens"
    if isinstance(req, CompletionRequest) and req.max_tokens is None:
        return COMPLETIONS_DEFAULT_MAX_TOKENS, "max_tokens"
    return req.max_tokens, "max_tokens"


def num_logprobs(req: _Common) -> int | None:
    """Alternatives per token the client asked for (None: no log-probs)."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    if req.logprobs:
        return req.top_logprobs or 0
    if req.top_logprobs is not None:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return None


def sampling_params(req: _Common, max_tokens: int) -> SamplingParams:
    """The runtime's ``SamplingParams`` for ``req`` with its ``max_tokens`` resolved (``check_length``)."""
    _refuse_unsupported(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise RequestError("Invalid 'stop': stop strings must be non-empty", "stop")
    if any(t < 0 for t in req.stop_token_ids or ()):
        raise RequestError("Invalid 'stop_token_ids': token ids are >= 0", "stop_token_ids")
    # OpenAI's default temperature is 1 (sampling); temperature 0 is greedy here as there
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                          top_p=1.0 if req.top_p is None else req.top_p,
                          top_k=max(0, req.top_k or 0), seed=req.seed, stop=tuple(stop),
                          stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
                          logprobs=num_logprobs(req))


def check_length(num_prompt: int, max_tokens: int | None, field: str, *, context: int, pool_tokens: int,
                 prompt_field: str) -> int:
    """``max_tokens`` for a prompt of ``num_prompt`` tokens: the client's, checked against the model's context and
    the KV pool (``pool_tokens``: what one request may hold), or when unset as many as both leave room for."""
    room = min(context, pool_tokens) - num_prompt
    if num_prompt >= context:
        raise RequestError(f"This model's maximum context length is {context} tokens; the prompt has {num_prompt} "
                           "tokens, leaving none to generate", prompt_field, code="context_length_exceeded")
    if room < 1:
        raise RequestError(f"the prompt has {num_prompt} tokens but the server's KV cache holds {pool_tokens} per "
                           "request: nothing left to generate", prompt_field, code="context_length_exceeded")
    if max_tokens is None:
        return room
    if num_prompt + max_tokens > context:
        raise RequestError(f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} in the "
                           f"completion): lower '{field}'", field, code="context_length_exceeded")
    if max_tokens > room:
        raise RequestError(f"'{field}' = {max_tokens} with a {num_prompt}-token prompt needs more KV cache than the "
                           f"server holds for one request ({pool_tokens} tokens): lower '{field}'", field)
    return max_tokens


__all__ = ["COMPLETIONS_DEFAULT_MAX_TOKENS", "ChatCompletionRequest", "ChatMessage", "CompletionRequest",
           "RequestError", "check_length", "num_logprobs", "parse", "requested_max_tokens", "sampling_params"]
