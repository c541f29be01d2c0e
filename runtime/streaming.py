"""Streaming a request's output as it is decided: only final tokens (accepted, never a placeholder still on the
device), and text that will not be taken back (the last characters that could still become a stop string, or an
incomplete UTF-8 sequence, wait for the next event)."""

from __future__ import annotations

from dataclasses import dataclass

from .request import Request


@dataclass
class StreamEvent:
    """What one prompt gained since its previous event (``LLM.generate_stream``).

    ``token_ids`` / ``text``: the new tokens and text (the concatenation over a prompt's events is its output's
    ``token_ids`` / ``text``); ``output``: the complete ``RequestOutput``, on the prompt's last event only."""

    index: int  # the prompt's position in the call
    token_ids: list[int]
    text: str
    output: object | None = None  # RequestOutput when finished

    @property
    def finished(self) -> bool:
        return self.output is not None


class TextDelta:
    """Per request: which tokens and how much text were already streamed."""

    def __init__(self, tokenizer, request: Request) -> None:
        self.tokenizer, self.request = tokenizer, request
        stop = request.params.stop
        self.hold = max(map(len, stop)) - 1 if stop else 0  # a stop string's beginning may be at the text's end
        self.tokens = 0
        self.text = ""

    def new(self) -> tuple[list[int], str]:
        """New final tokens and text of a running request."""
        r = self.request
        if r.is_finished:  # finished in this step, reported by the next: its text may be cut at a stop string
            return [], ""
        final = len(r.output_token_ids) - r.num_pending  # overlap: trailing placeholders are not tokens yet
        ids = r.output_token_ids[self.tokens:final]
        if not ids:
            return [], ""
        self.tokens = final
        if self.tokenizer is None:
            return ids, ""
        text = self.tokenizer.decode(r.output_token_ids[:final], skip_special_tokens=True)
        end = len(text) - self.hold
        while end > len(self.text) and text[end - 1] == "\ufffd":  # an incomplete character: wait for its bytes
            end -= 1
        return ids, self._take(text, end)

    def last(self, output_text: str | None, output_ids: list[int]) -> tuple[list[int], str]:
        """The rest, once the request finished with ``output_ids`` / ``output_text``."""
        ids = output_ids[self.tokens:]
        self.tokens = len(output_ids)
        return ids, self._take(output_text or "", len(output_text or ""))

    def _take(self, text: str, end: int) -> str:
        if end <= len(self.text) or not text.startswith(self.text):
            return ""  # (a decode that rewrote streamed text cannot be taken back: nothing more until it agrees)
        delta, self.text = text[len(self.text):end], text[:end]
        return delta


__all__ = ["StreamEvent", "TextDelta"]
