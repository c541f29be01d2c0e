"""Streamed text, decoded incrementally on the event loop (never in the step loop).

Each chunk decodes only the new tokens (``tokenizers.decoders.DecodeStream``: the tokenizer's own decoder over a
sliding prefix, holding an incomplete UTF-8 character back), so a 1,024-token answer costs O(1) per chunk instead of
re-decoding the whole output each time (what ``runtime.streaming.TextDelta`` does). Text that could still be the
start of a stop string is held back; the request's last chunk is the rest of its final text (the runtime's full
decode, cut at the stop string), so the chunks concatenate to exactly the non-streamed ``text``.
"""

from __future__ import annotations

import logging

log = logging.getLogger("sparsespec.serve")


class IncrementalText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast (Rust) tokenizer
        self._backend = backend
        self._stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []  # a slow tokenizer: the whole output is decoded again each chunk
        self.hold = max(map(len, stop)) - 1 if stop else 0
        self.decoded = ""  # everything decoded so far
        self.sent = 0  # characters of ``decoded`` already streamed

    def add(self, token_ids: list[int]) -> str:
        """The text to stream for the next tokens of the output."""
        if self._stream is not None:
            for t in token_ids:
                piece = self._stream.step(self._backend, t)
                if piece:
                    self.decoded += piece
        else:
            self._ids += token_ids
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            self.decoded = text.rstrip("\ufffd")  # an incomplete character waits for its last byte
        end = len(self.decoded) - self.hold
        if end <= self.sent:
            return ""
        out, self.sent = self.decoded[self.sent:end], end
        return out

    def finish(self, final_text: str | None) -> str:
        """The rest of the output once it is finished with ``final_text``."""
        final = final_text or ""
        streamed = self.decoded[:self.sent]
        if not final.startswith(streamed):  # cannot take streamed text back: say so rather than send a wrong tail
            log.warning("streamed text %r is not a prefix of the final text %r", streamed[-40:], final[-40:])
            return final[self.sent:] if len(final) > self.sent else ""
        self.sent = len(final)
        return final[len(streamed):]


__all__ = ["IncrementalText"]
