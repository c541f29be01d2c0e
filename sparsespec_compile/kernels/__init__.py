"""Kernels of the dual path (they import only torch and triton).

Each operation is one dispatcher taking ``impl in {"reference", "triton"}``: the pure-PyTorch reference
(``reference.py``, the test oracle and the CPU fallback) or the Triton kernel (CUDA, or the CPU interpreter
under ``TRITON_INTERPRET=1``).
"""

import functools

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


@functools.lru_cache(maxsize=None)  # called per row per step by the runtime's step costs
def query_passes(num_q_heads: int, num_kv_heads: int, query_len: int, impl: str = "triton") -> int:
    """How many times the attention of a decode / draft / verify row (<= 16 queries) reads the row's keys: its
    queries' q-blocks (``BLOCK_Q`` queries of one KV head's GQA group each) each make one pass. The runtime's step
    costs count a verify row's keys this many times. The reference attention makes one pass whatever the count."""
    if impl != "triton" or query_len <= 1:
        return 1
    from .attention_triton import plan_blocks

    block_q = plan_blocks(num_q_heads, num_kv_heads, min(query_len, 16))[0]
    return -(-query_len // block_q)


__all__ = [
    "query_passes",
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
