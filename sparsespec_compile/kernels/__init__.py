"""Kernels of the dual path (they import only torch and triton).

Each operation is one dispatcher taking ``impl in {"reference", "triton"}``: the pure-PyTorch reference
(``reference.py``, the test oracle and the CPU fallback) or the Triton kernel (CUDA, or the CPU interpreter
under ``TRITON_INTERPRET=1``).
"""

from .attention import unified_attention
from .kv_write import write_kv
from .pillars import pillar_scores, select_pillars
from .reference import (
    pillar_scores_reference,
    select_pillars_reference,
    unified_attention_reference,
    write_kv_reference,
)

__all__ = [
    "write_kv",
    "unified_attention",
    "pillar_scores",
    "select_pillars",
    "write_kv_reference",
    "unified_attention_reference",
    "pillar_scores_reference",
    "select_pillars_reference",
]
