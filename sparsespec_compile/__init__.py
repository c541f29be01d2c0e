"""sparsespec: a torch.compile backend for sparse self-speculative decoding of Hugging Face decoder models.

    compiled = torch.compile(model, backend="sparsespec")   # attention -> sparsespec::attention
    llm = sparsespec_compile.LLM(compiled)                   # the speculative runtime
"""

from . import ops  # noqa: F401  (registers torch.ops.sparsespec.attention)
from .backend import last_report, sparsespec_backend
from .config import SparseSpecConfig
from .context import ForwardContext, forward_context, get_forward_context
from .inspection import inspect
from .passes import RewriteReport

_RUNTIME = {"LLM": "llm", "RequestOutput": "llm", "SamplingParams": "sampling_params"}


def __getattr__(name: str):
    # The runtime sits above the backend (kernels <- ops <- passes <- backend <- runtime): import it lazily so
    # `import sparsespec_compile` (and the entry point) stay light and free of cycles.
    if name in _RUNTIME:
        import importlib

        return getattr(importlib.import_module(f".runtime.{_RUNTIME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LLM",
    "RequestOutput",
    "SamplingParams",
    "ForwardContext",
    "RewriteReport",
    "SparseSpecConfig",
    "forward_context",
    "get_forward_context",
    "inspect",
    "last_report",
    "sparsespec_backend",
]
__version__ = "0.1.0"
