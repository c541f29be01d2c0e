"""Public Hypothesis strategies: tiny model specs and the inputs to feed them.

    @given(spec=model_configs(families=["llama", "gpt2"]), data=st.data())
    def test_mine(spec, data):
        inputs = data.draw(inputs_for(spec.config, max_len=12))
        check_rewrite(tiny_model(spec.config, spec.attn), inputs)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import transformers
from hypothesis import strategies as st

from .families import FAMILIES, Family, family_of

FIRST_TOKEN = 3  # ids 0, 1, 2 are pad / bos / eos in the tiny configs


@dataclass(frozen=True)
class ModelSpec:
    """One drawn tiny model: its family, the attention implementation to load it with, and its config."""

    family: str
    attn: str
    config: transformers.PretrainedConfig

    def __repr__(self) -> str:  # what Hypothesis prints for a falsifying example
        c = self.config
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return (
            f"ModelSpec({self.family}/{self.attn}: layers={c.num_hidden_layers} heads={c.num_attention_heads} "
            f"kv_heads={kv} head_dim={head_dim})"
        )


def _names(families: Iterable[str] | None) -> list[str]:
    names = list(FAMILIES) if families is None else list(families)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {sorted(FAMILIES)}")
    return names


def family_attn_pairs(
    families: Iterable[str] | None = None, attn: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """Every (family, attention implementation) pair transformers supports, in a stable order."""
    wanted = None if attn is None else set(attn)
    return [(f, a) for f in _names(families) for a in FAMILIES[f].attn if wanted is None or a in wanted]


@st.composite
def model_configs(
    draw,
    families: Iterable[str] | None = None,
    attn: Iterable[str] | None = None,
    max_layers: int = 3,
    head_counts: tuple[int, ...] = (1, 2, 4),
) -> ModelSpec:
    """A tiny model spec: family x attention impl, layers 1..max_layers, heads, KV heads (MHA, GQA, MQA), head dim."""
    pairs = family_attn_pairs(families, attn)
    if not pairs:
        raise ValueError(f"no (family, attn) pair supports attn={attn} among families={families}")
    name, impl = draw(st.sampled_from(pairs))
    fam: Family = FAMILIES[name]
    layers = draw(st.integers(1, max_layers))
    heads = draw(st.sampled_from(head_counts))
    if fam.gqa:
        kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    else:
        kv_heads = heads
    head_dim = draw(st.sampled_from(fam.head_dims))
    config = fam.config(layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    return ModelSpec(name, impl, config)


@st.composite
def inputs_for(
    draw,
    config: transformers.PretrainedConfig,
    max_len: int = 16,
    max_batch: int = 3,
    padding: bool | None = None,
) -> dict[str, torch.Tensor]:
    """``{"input_ids": [B, S] int64, "attention_mask": [B, S] int64}`` for a model built from ``config``.

    ``padding``: ``True`` = left padding (each row keeps at least one real token), ``False`` = none, ``None`` =
    either. Without padding the mask is sometimes left out, so the mask-free (``is_causal``) form is drawn too.
    """
    batch = draw(st.integers(1, max_batch))
    seq = draw(st.integers(1, max_len))
    vocab = config.vocab_size
    pad_id = getattr(config, "pad_token_id", None) or 0
    row = st.lists(st.integers(FIRST_TOKEN, vocab - 1), min_size=seq, max_size=seq)
    ids = draw(st.lists(row, min_size=batch, max_size=batch))
    input_ids = torch.tensor(ids, dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long)
    pad = draw(st.booleans()) if padding is None else padding
    if pad and seq > 1:
        lefts = draw(st.lists(st.integers(0, seq - 1), min_size=batch, max_size=batch))
        if max(lefts) == 0:  # make the padding real
            lefts[0] = seq - 1 if seq > 1 else 0
        for row, n in enumerate(lefts):
            mask[row, :n] = 0
            input_ids[row, :n] = pad_id
        return {"input_ids": input_ids, "attention_mask": mask}
    if draw(st.booleans()):
        return {"input_ids": input_ids}
    return {"input_ids": input_ids, "attention_mask": mask}


@st.composite
def prompts(
    draw, vocab_size: int, max_len: int = 32, max_prompts: int = 3, min_len: int = 1
) -> list[list[int]]:
    """1..``max_prompts`` token-id prompts of ``min_len..max_len`` tokens (ids from 3: not pad / bos / eos), for
    ``check_lossless``; mixed lengths put requests at different phases of their draft cycles."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    row = st.integers(min_len, max_len).flatmap(
        lambda n: st.lists(st.integers(FIRST_TOKEN, vocab_size - 1), min_size=n, max_size=n)
    )
    return draw(st.lists(row, min_size=1, max_size=max_prompts))


@dataclass(frozen=True)
class SpeculationSettings:
    """A (stride, budget) pair for ``check_lossless(model, inputs, **settings.kwargs)``."""

    stride: int
    budget: int

    @property
    def kwargs(self) -> dict[str, int]:
        return {"stride": self.stride, "budget": self.budget}


@st.composite
def speculation_settings(
    draw, max_stride: int = 8, budgets: Iterable[int] = (1, 2, 5, 8, 1000)
) -> SpeculationSettings:
    """Stride 1..``max_stride`` and a pillar budget from ``budgets``: 1 (the sparsest draft), small ones below
    typical prompt lengths, and one above every context (the draft is then full attention)."""
    budgets = tuple(budgets)
    if max_stride < 1 or not budgets or min(budgets) < 1:
        raise ValueError(f"need max_stride >= 1 and budgets >= 1, got {max_stride}, {budgets}")
    return SpeculationSettings(draw(st.integers(1, max_stride)), draw(st.sampled_from(budgets)))


__all__ = ["ModelSpec", "SpeculationSettings", "family_attn_pairs", "family_of", "inputs_for", "model_configs",
           "prompts", "speculation_settings"]
