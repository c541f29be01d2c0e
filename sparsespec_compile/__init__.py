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

__all__ = [
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
