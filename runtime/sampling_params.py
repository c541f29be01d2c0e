"""Per-request sampling parameters (torch-free), validated at construction so a bad value fails at the API
boundary with a message that names the field, instead of deep inside a step where it would take down the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    ``temperature == 0`` is greedy (argmax; ``top_p``/``top_k``/``seed`` are then irrelevant). With
    ``temperature > 0`` the logits are divided by the temperature, then restricted to the ``top_k`` most likely
    tokens (0 = off), then to the smallest set whose probability reaches ``top_p`` (HF's order). Speculative
    verification applies exactly the same transform to the draft and the target, which keeps it lossless.

    ``seed``: the token at each output position is drawn with noise fixed by (seed, position), so a seeded request
    is reproducible whatever else is batched with it and whatever its draft/verify schedule; its drafts are verified
    by Gumbel-max coupling (accepted iff equal to the target's own sample under that noise: exact, the acceptance
    a little below rejection sampling's). ``None`` draws from the engine's shared generator (rejection sampling). Generation stops at ``max_tokens`` new tokens, at a
    token in ``stop_token_ids`` (always), or at the model's EOS (unless ``ignore_eos``); the stop token is kept in
    the output ids, as HF ``generate`` does. ``stop``: strings; the request stops at the first token whose text
    completes one (exactly as plain decoding would, under speculation too), its ids kept up to that token, its text
    cut before the string (vLLM's default); needs the LLM's tokenizer. ``logprobs``: return each output token's
    log-prob and its ``logprobs`` most likely alternatives' (``RequestOutput.logprobs``), under the model's raw
    distribution (before temperature / top-k / top-p, as vLLM).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise ValueError(f"SamplingParams.temperature must be a float >= 0, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be a finite float >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if (not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool)
                or not (0.0 < self.top_p <= 1.0)):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not (0 <= self.seed < 2**63)):
            raise ValueError(f"SamplingParams.seed must be None or an int in [0, 2**63), got {self.seed!r}")
        # Accept any iterable of ints (a list is the natural thing to pass) but store a tuple: frozen + hashable.
        try:
            stops = tuple(self.stop_token_ids)
        except TypeError:
            raise ValueError(f"SamplingParams.stop_token_ids must be a sequence of token ids >= 0, "
                             f"got {self.stop_token_ids!r}") from None
        for t in stops:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"SamplingParams.stop_token_ids must hold ints >= 0, got {t!r} in {stops!r}")
        object.__setattr__(self, "stop_token_ids", stops)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise ValueError(f"SamplingParams.stop must be a string or a sequence of strings, got {self.stop!r}") from None
        if any(not isinstance(x, str) or not x for x in stop):
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", stop)
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise ValueError(f"SamplingParams.logprobs must be None or an int in [0, 20] (alternatives per token), "
                             f"got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
