"""Stop strings (``SamplingParams.stop``): a request stops at the first output token whose text completes one.

Checked by the scheduler after every appended token, in order, like a stop id: a verify that accepts several tokens
keeps them only up to the one that completes a stop string, so the output is exactly what plain decoding with the
same stop strings would give (the tokens after it were never emitted). The text is the tokenizer's decode of the
output ids (``skip_special_tokens=True``, as ``RequestOutput.text``), searched only where a new match can end.
"""

from __future__ import annotations

from typing import Sequence


class StopStrings:
    """One request's matcher: ``__call__(ids, n)`` is True once the text of ``ids[:n]`` contains a stop string.

    After a match, ``matched`` is that string and ``index`` where it starts in the text (the output text is cut
    there: the stop string is not part of it, as in vLLM)."""

    # Characters before the previous text's end searched again: decoding more tokens may rewrite the last few
    # (an incomplete UTF-8 sequence shown as U+FFFD until its last byte arrives).
    _MARGIN = 4

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        if tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer to read the text: LLM(model, tokenizer=...)")
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.longest = max(len(s) for s in self.stops)
        self.searched = 0  # text length at the previous call
        self.matched: str | None = None
        self.index = -1

    def __call__(self, ids: Sequence[int], n: int) -> bool:
        text = self.tokenizer.decode(list(ids[:n]), skip_special_tokens=True)
        start = max(0, self.searched - self.longest - self._MARGIN)
        self.searched = len(text)
        hits = [(i, s) for s in self.stops if (i := text.find(s, start)) >= 0]
        if not hits:
            return False
        self.index, self.matched = min(hits)
        return True

    def cut(self, text: str) -> str:
        """The output text without the stop string and what followed it."""
        return text if self.matched is None else text[: self.index]


__all__ = ["StopStrings"]
