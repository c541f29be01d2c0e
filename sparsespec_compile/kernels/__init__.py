"""Kernels of the dual path (they import only torch and triton).

Each operation is one dispatcher taking ``impl in {"reference", "triton"}``: the pure-PyTorch reference
(``reference.py``, the test oracle and the CPU fallback) or the Triton kernel (CUDA, or the CPU interpreter
under ``TRITON_INTERPRET=1``).
"""

from .attention import unified_attention
from .attention_plan import AttentionPlan
from .kv_write import write_kv
from .pillars import pillar_scores, select_pillars
from .reference import (
    pillar_scores_reference,
    select_pillars_reference,
    unified_attention_reference,
    write_kv_reference,
)


def attention_plan(*args, **kwargs):
    """The work plan of a unified-attention launch (see :func:`.attention_triton.attention_plan`), built once per
    step and passed to every layer's :func:`unified_attention`; imports Triton."""
    from .attention_triton import attention_plan as _plan

    return _plan(*args, **kwargs)


__all__ = [
    "write_kv",
    "unified_attention",
    "AttentionPlan",
    "attention_plan",
    "pillar_scores",
    "select_pillars",
    "write_kv_reference",
    "unified_attention_reference",
    "pillar_scores_reference",
    "select_pillars_reference",
]
