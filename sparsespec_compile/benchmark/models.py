"""The benchmark's models (named ones, or an HF checkpoint directory, sharded under torchrun) and its prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

MODEL_NAMES = ("smollm2", "gemma3", "qwen3-8b-random", "tiny-random")


def build_model(name: str, device: str, dtype: torch.dtype, gguf: str | None, world: int = 1):
    """(model, tokenizer or None, description) for ``--model``: one of MODEL_NAMES, or a directory holding an HF
    checkpoint (loaded with ``tp_plan="auto"`` when ``world`` > 1: each rank gets its shard)."""
    if Path(name).is_dir():
        return load_checkpoint(Path(name), device, dtype, world)
    if name in ("smollm2", "gemma3"):
        from ..models import load_embedded

        model, tok = load_embedded(name, dtype=dtype, device=device, gguf_path=gguf)
        what = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma3-270M (base)"}[name]
        return model, tok, f"{what} (real weights, {_dtype_name(dtype)})"
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    if name == "qwen3-8b-random":
        if not device.startswith("cuda"):
            raise SystemExit("--model qwen3-8b-random is built on the GPU (16 GB of bf16 weights): use --device cuda")
        cfg = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                          rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
        torch.manual_seed(0)
        # Built inside the device context: the 8B parameters are allocated and initialized on the GPU directly
        # (a CPU init of 8B parameters takes minutes and 32 GB of host memory).
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        return model.eval(), None, f"Qwen3-8B-shaped, random weights (HF init, {_dtype_name(dtype)})"
    if name == "tiny-random":
        from ..testing import tiny_model

        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          tie_word_embeddings=False)
        # O(1)-scale random weights (tiny_model): greedy argmaxes are not near-ties, so outputs compare exactly.
        model = tiny_model(cfg, attn="sdpa", seed=0).to(device=device, dtype=dtype)
        return model.eval(), None, f"tiny random Llama (2 layers, {_dtype_name(dtype)})"
    raise SystemExit(f"unknown --model {name!r}")


def load_checkpoint(path: Path, device: str, dtype: torch.dtype, world: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..runtime.parallel import tp_from_pretrained_kwargs

    where = tp_from_pretrained_kwargs() if world > 1 else {"device_map": device}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **where)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a weights-only checkpoint (--save-model of a random model): random prompts
        tok = None
    how = f", tensor parallel over {world} ranks" if world > 1 else ""
    return model.eval(), tok, f"{path.name} ({type(model).__name__}, {_dtype_name(dtype)}{how})"


def question_ids(tok, question: str) -> list[int]:
    """A GSM8K question as token ids: through the chat template when the tokenizer has one (an Instruct model), else
    as plain text a base model continues (Gemma3-270M has no template)."""
    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": question + "\nAnswer step by step."}],
                                      add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    return list(tok(f"Question: {question}\nAnswer: Let's think step by step.")["input_ids"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def max_positions(model) -> int:
    text = model.config.get_text_config()
    return int(getattr(text, "max_position_embeddings", 0) or 0)


def load_prompts(path: Path | None, tok, vocab_size: int, batch: int, prompt_len: int, seed: int,
                 num_requests: int | None = None) -> tuple[list[list[int]], str]:
    """``num_requests`` (default ``batch``) token-id prompts and where they came from: the first GSM8K questions
    through the chat template when a tokenizer and the file has ``batch`` of them (repeated in order past the
    file's end), else random tokens (``prompt_len`` each, same seed every cell)."""
    n = num_requests or batch
    if tok is not None and path is not None and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(rows) >= batch:
            prompts = []
            for i in range(n):
                r = rows[i % len(rows)]
                prompts.append(question_ids(tok, r.get("question") or r.get("problem")))
            what = f"first {n}" if n <= len(rows) else f"{len(rows)} repeated to {n}"
            how = "chat template" if getattr(tok, "chat_template", None) else "plain 'Question: ... Answer:' text"
            return prompts, f"{path.name} ({what}, {how})"
        print(f"warning: {path} has {len(rows)} prompts for a batch of {batch}: random-token prompts instead",
              file=sys.stderr)
    g = torch.Generator().manual_seed(seed)
    low = min(10, vocab_size // 4)  # keep clear of the special tokens at the start of most vocabularies
    ids = torch.randint(low, vocab_size - low, (n, prompt_len), generator=g)
    return ids.tolist(), f"random tokens ({prompt_len} each)"
