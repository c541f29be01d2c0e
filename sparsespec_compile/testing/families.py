"""The model families the backend is tested on, each with a tiny-config factory.

A factory takes the architecture knobs the Hypothesis strategies draw and returns a transformers config
small enough that a forward pass takes milliseconds on CPU (vocab 96, hidden = heads * head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import transformers

VOCAB = 96
MAX_POSITIONS = 256


@dataclass(frozen=True)
class Family:
    """A decoder family: how to build a tiny config, which attention implementations transformers offers for it.

    ``gqa``: whether the family has a ``num_key_value_heads`` knob (GPT-2 and GPT-NeoX are MHA only).
    ``head_dims``: head dims the family accepts (rotary embeddings need an even rotary dim).
    ``attn_unsupported``: attention implementations transformers does not offer, with the reason (recorded
    as n/a in the test matrix rather than silently skipped).
    """

    name: str
    make_config: Callable[..., transformers.PretrainedConfig]
    attn: tuple[str, ...] = ("sdpa", "eager")
    gqa: bool = True
    head_dims: tuple[int, ...] = (8, 16)
    attn_unsupported: tuple[tuple[str, str], ...] = ()

    def config(
        self, *, layers: int = 2, heads: int = 4, kv_heads: int | None = None, head_dim: int = 8, **overrides
    ) -> transformers.PretrainedConfig:
        """A tiny config; ``kv_heads`` defaults to ``heads`` (MHA) and must divide it."""
        kv_heads = heads if kv_heads is None else kv_heads
        if heads % kv_heads:
            raise ValueError(f"{self.name}: heads={heads} is not a multiple of kv_heads={kv_heads}")
        if not self.gqa and kv_heads != heads:
            raise ValueError(f"{self.name} has no GQA: kv_heads must equal heads ({heads}), got {kv_heads}")
        return self.make_config(layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, **overrides)


def _common(layers: int, heads: int, head_dim: int) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _llama(*, layers, heads, kv_heads, head_dim, **kw):
    return transformers.LlamaConfig(
        num_key_value_heads=kv_heads, head_dim=head_dim, **_common(layers, heads, head_dim), **kw
    )


def _mistral(*, layers, heads, kv_heads, head_dim, **kw):
    kw.setdefault("sliding_window", 5)  # short enough that the drawn sequences cross it
    return transformers.MistralConfig(
        num_key_value_heads=kv_heads, head_dim=head_dim, **_common(layers, heads, head_dim), **kw
    )


def _qwen2(*, layers, heads, kv_heads, head_dim, **kw):
    return transformers.Qwen2Config(num_key_value_heads=kv_heads, **_common(layers, heads, head_dim), **kw)


def _qwen3(*, layers, heads, kv_heads, head_dim, **kw):
    return transformers.Qwen3Config(
        num_key_value_heads=kv_heads, head_dim=head_dim, **_common(layers, heads, head_dim), **kw
    )


def _phi3(*, layers, heads, kv_heads, head_dim, **kw):
    return transformers.Phi3Config(num_key_value_heads=kv_heads, **_common(layers, heads, head_dim), **kw)


def _gemma2(*, layers, heads, kv_heads, head_dim, **kw):
    # query_pre_attn_scalar keeps its default 256: scale 1/16 != 1/sqrt(head_dim), which tests scale plumbing;
    # attn_logit_softcapping keeps its default 50 (the softcap form); layers alternate sliding / full.
    kw.setdefault("sliding_window", 5)
    return transformers.Gemma2Config(
        num_key_value_heads=kv_heads, head_dim=head_dim, **_common(layers, heads, head_dim), **kw
    )


def _gemma3(*, layers, heads, kv_heads, head_dim, **kw):
    kw.setdefault("sliding_window", 5)
    return transformers.Gemma3TextConfig(
        num_key_value_heads=kv_heads, head_dim=head_dim, **_common(layers, heads, head_dim), **kw
    )


def _gpt2(*, layers, heads, kv_heads, head_dim, **kw):
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=heads * head_dim, n_layer=layers, n_head=heads, n_positions=MAX_POSITIONS,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw,
    )


def _gpt_neox(*, layers, heads, kv_heads, head_dim, **kw):
    common = _common(layers, heads, head_dim)
    return transformers.GPTNeoXConfig(**common, **kw)


def _olmo2(*, layers, heads, kv_heads, head_dim, **kw):
    return transformers.Olmo2Config(num_key_value_heads=kv_heads, **_common(layers, heads, head_dim), **kw)


_NO_SDPA = (("sdpa", "transformers has no sdpa attention for Gemma2 (softcapping needs eager)"),)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", _llama),
        Family("mistral", _mistral),
        Family("qwen2", _qwen2),
        Family("qwen3", _qwen3),
        Family("phi3", _phi3),
        Family("gemma2", _gemma2, attn=("eager",), attn_unsupported=_NO_SDPA),
        Family("gemma3", _gemma3),
        Family("gpt2", _gpt2, gqa=False),
        Family("gpt_neox", _gpt_neox, gqa=False),
        Family("olmo2", _olmo2),
    )
}


def family_of(config: transformers.PretrainedConfig) -> Family:
    """The Family whose factory built ``config`` (by ``model_type``)."""
    model_type = {"gemma3_text": "gemma3"}.get(config.model_type, config.model_type)
    try:
        return FAMILIES[model_type]
    except KeyError:
        known = sorted(FAMILIES)
        raise ValueError(f"no tiny-model family for model_type {config.model_type!r}; known: {known}") from None
