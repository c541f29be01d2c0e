"""Options given to ``torch.compile(model, backend="sparsespec", options={...})`` reach the runtime.

``torch.compile`` keeps ``options`` inside the Dynamo wrapper it returns and calls the backend with them only when
a graph is compiled (the first call); ``LLM(compiled)`` may come before that. So ``compile_options_of`` reads them
back from the wrapper, and ``resolve_config`` makes the one ``SparseSpecConfig`` an ``LLM`` runs with:

* compile-time options (``COMPILE_TIME``: the compiler, ``fuse_projections``) shape the graph itself: an ``LLM``
  config asking for another value than the module was compiled with is refused, naming where it belongs;
* runtime options (stride, adaptive, draft, budgets, pool sizes, ...) given at compile time are honoured; given
  both at compile time and to ``LLM`` with different values, they are refused (give it once).

A field counts as given when it differs from the ``SparseSpecConfig()`` default (a frozen dataclass does not record
which arguments were passed; passing a default explicitly changes nothing either way).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .config import SparseSpecConfig

COMPILE_TIME = ("compiler", "fuse_projections")  # read by the backend when it compiles a graph; the rest: runtime
_DEFAULT = SparseSpecConfig()


def compile_options_of(compiled: Any) -> dict[str, Any] | None:
    """The ``options`` a ``torch.compile(..., backend="sparsespec")`` module was given (``{}`` if none), or None when
    ``compiled`` is not such a module (another backend, or not compiled)."""
    from .backend import sparsespec_backend

    obj = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    for _ in range(8):  # CatchErrorsWrapper -> ConvertFrame -> WrapBackendDebug -> _TorchCompileWrapper (torch 2.13)
        if obj is None:
            return None
        if getattr(obj, "compiler_fn", None) is sparsespec_backend and isinstance(getattr(obj, "kwargs", None), dict):
            options = obj.kwargs.get("options") or {}
            if isinstance(options, SparseSpecConfig):
                return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
            return dict(options)
        obj = getattr(obj, "_torchdynamo_orig_backend", None) or getattr(obj, "__wrapped__", None)
    return None


def _given(config: SparseSpecConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(_DEFAULT, f.name)}


def resolve_config(compile_options: Mapping[str, Any] | None, config: SparseSpecConfig | None) -> SparseSpecConfig:
    """The config of an ``LLM`` over a module compiled with ``compile_options`` (None: not compiled by us), given
    ``config`` (None: none given). Raises ``ValueError`` naming the option and where it belongs on a conflict."""
    if compile_options is None:
        return config if config is not None else SparseSpecConfig()
    carried = SparseSpecConfig.from_options(compile_options)  # unknown or invalid options: the same error as compile
    if config is None:
        return carried
    at_compile, at_llm = _given(carried), _given(config)
    for name in COMPILE_TIME:
        if name in at_llm and at_llm[name] != getattr(carried, name):
            raise ValueError(
                f"{name}={at_llm[name]!r} is a compile-time option, but the model was compiled with "
                f"{name}={getattr(carried, name)!r}: pass it to torch.compile(model, backend='sparsespec', "
                f"options={{{name!r}: {at_llm[name]!r}}}), or give LLM the uncompiled model to compile it for you")
    clash = sorted(n for n in at_compile.keys() & at_llm.keys() if n not in COMPILE_TIME and at_compile[n] != at_llm[n])
    if clash:
        both = ", ".join(f"{n}={at_compile[n]!r} at torch.compile vs {at_llm[n]!r} at LLM" for n in clash)
        raise ValueError(f"runtime option(s) given twice with different values ({both}): give each once, in "
                         f"torch.compile(..., options=...) or in LLM(..., config=SparseSpecConfig(...))")
    return dataclasses.replace(config, **at_compile)
