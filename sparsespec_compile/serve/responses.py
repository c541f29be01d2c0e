"""OpenAI response bodies: completions and chat completions, whole or as server-sent-event chunks."""

from __future__ import annotations

import json
import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(reason: str) -> str:
    """The runtime's finish reason as OpenAI names it ("stop" also covers EOS, a stop id and a stop string)."""
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class Envelope:
    """The fields every body or chunk of one response shares."""

    def __init__(self, kind: str, model: str) -> None:
        self.chat = kind == "chat"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        head = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": model}
        self._chunk_head = "data: " + json.dumps(head, separators=(",", ":"))[:-1] + ',"choices":[{"index":'
        self._chunk_field = ',"delta":{"content":' if self.chat else ',"text":'
        self._chunk_tail = ('}' if self.chat else '') + ',"logprobs":null,"finish_reason":null}]}\n\n'

    def text_chunk(self, index: int, text: str) -> str:
        """``sse(body([choice(index, text, None, chunk=True)], None, chunk=True))`` for a non-empty ``text``, without
        building and encoding the dicts: the chunk most of a stream is made of, hundreds of them per step."""
        return f"{self._chunk_head}{index}{self._chunk_field}{json.dumps(text)}{self._chunk_tail}"

    def body(self, choices: list[dict], usage_: dict | None, chunk: bool = False) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage_ is not None or not chunk:
            out["usage"] = usage_
        return out

    def choice(self, index: int, text: str | None, reason: str | None, logprobs: dict | None = None,
               chunk: bool = False, role: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        if chunk:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "message": {"role": "assistant", "content": text or ""}, "logprobs": logprobs,
                "finish_reason": reason}


class LogprobFormatter:
    """``RequestOutput.logprobs`` entries (per token, ``{id: log-prob}`` of the token and its top alternatives) in
    the completions (``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``) or chat
    (``content: [{token, logprob, bytes, top_logprobs}]``) layout."""

    def __init__(self, tokenizer, chat: bool, top: int) -> None:
        self.tokenizer, self.chat, self.top = tokenizer, chat, top
        self.offset = 0  # completions' text_offset: characters of the tokens so far

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def format(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> dict | None:
        if logprobs is None:
            return None
        rows = list(zip(token_ids, logprobs))
        if self.chat:
            content = []
            for t, lp in rows:
                s = self._text(t)
                alts = sorted(lp.items(), key=lambda kv: -kv[1])[: self.top]
                content.append({"token": s, "logprob": lp[t], "bytes": list(s.encode()),
                                "top_logprobs": [{"token": self._text(a), "logprob": v,
                                                  "bytes": list(self._text(a).encode())} for a, v in alts]})
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in rows:
            s = self._text(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp[t])
            alts = sorted(lp.items(), key=lambda kv: -kv[1])[: self.top]
            out["top_logprobs"].append({self._text(a): v for a, v in alts})
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        return out


__all__ = ["Envelope", "LogprobFormatter", "finish_reason", "new_id", "sse", "usage"]
