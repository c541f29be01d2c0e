"""What ``LLM.generate`` accepts as prompts, checked at the boundary with errors that say what is accepted.

A malformed *call* (not a prompt or a list of prompts at all) raises; a malformed *prompt* inside a good call fails
only its own request (``encode`` raises ``ValueError``, which ``LLM.generate`` turns into that request's
``finish_reason="error: ..."``).
"""

from __future__ import annotations

import numbers
from typing import Any

ACCEPTED = ("a prompt is a string (needs a tokenizer) or a sequence of int token ids (list, tuple, 1-D integer "
            "tensor); a call takes one prompt or a list of them")


def _is_id(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def split_prompts(prompts: Any) -> list[Any]:
    """The call's prompts, one list item per request. Raises TypeError / ValueError for a malformed call."""
    import torch

    if isinstance(prompts, (str, bytes)):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 2:
            raise ValueError(
                f"a 2-D tensor of prompts ({tuple(prompts.shape)}) does not say which ids are padding: pass a list "
                "of prompts instead, e.g. [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]")
        return [prompts]  # one prompt; encode() checks its dtype and shape
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError(f"generate() got no prompts: {ACCEPTED}")
        if any(_is_number(t) for t in prompts):  # token ids (one prompt), possibly with bad ones: encode() says which
            return [prompts]
        return list(prompts)
    raise TypeError(f"generate() got prompts of type {type(prompts).__name__}: {ACCEPTED}")


def encode(prompt: Any, tokenizer=None, chat: bool = False) -> list[int]:
    """One prompt as token ids. ``chat``: a string goes through the tokenizer's chat template as one user message.
    Raises ValueError naming the problem (the caller fails only this request)."""
    import torch

    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: LLM(model, tokenizer=...), or pass token ids")
        if chat:
            return chat_ids(tokenizer, [{"role": "user", "content": prompt}])
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ValueError(f"a tensor prompt must be 1-D integer token ids, got shape {tuple(prompt.shape)} "
                             f"{prompt.dtype}")
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt {prompt!r} ({type(prompt).__name__}) is not a prompt: {ACCEPTED}")
    for i, t in enumerate(prompt):
        if not _is_id(t):
            raise ValueError(f"token ids must be ints; item {i} of the prompt is {t!r} ({type(t).__name__})")
    return [int(t) for t in prompt]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """``messages`` through the tokenizer's chat template, with the assistant turn opened."""
    if tokenizer is None:
        raise ValueError("chat messages need a tokenizer: LLM(model, tokenizer=...)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template: pass plain prompts "
                         "(use_chat_template=False) or a tokenizer of a chat/instruct model")
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


__all__ = ["ACCEPTED", "chat_ids", "encode", "split_prompts"]
