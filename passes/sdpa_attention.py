"""Rewrite ``scaled_dot_product_attention`` calls (HF's ``sdpa`` attention) to ``sparsespec::attention``.

Covers what transformers emits: prefill with ``is_causal=True`` and no mask, masked calls (padding, decode,
StaticCache) with K/V repeated by ``repeat_kv`` (expand + reshape, removed here so the op sees the KV heads
once), and ``enable_gqa=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from ..ops import MATH_SDPA
from .base import GraphPass, describe, insert_attention
from .graph_utils import arg, is_call, is_const_number, shape, strip_repeat_kv
from .report import AttentionRecord

SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    F.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)


class SDPAAttentionPass(GraphPass):
    name = "sdpa_attention"

    def __call__(self, gm: fx.GraphModule) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            if not is_call(node, *SDPA_TARGETS):
                continue
            q, k, v = node.args[:3]
            mask = arg(node, 3, "attn_mask")
            dropout_p = arg(node, 4, "dropout_p", 0.0)
            is_causal = arg(node, 5, "is_causal", False)
            scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
            qs = shape(q)
            if not (is_const_number(dropout_p) and dropout_p == 0.0):
                self.reject(node, "sdpa", f"dropout_p={dropout_p} (training-mode dropout is not rewritten)")
                continue
            if not isinstance(is_causal, bool):
                self.reject(node, "sdpa", "is_causal is not a constant")
                continue
            if scale is not None and not is_const_number(scale):
                self.reject(node, "sdpa", "scale is not a constant")
                continue
            if qs is None or len(qs) != 4 or qs[3] <= 0:
                self.reject(node, "sdpa", f"query is not [batch, heads, seq, head_dim] (shape {qs})")
                continue
            if mask is not None and not isinstance(mask, fx.Node):
                self.reject(node, "sdpa", "attn_mask is not a tensor")
                continue
            k_src, nk = strip_repeat_kv(k)
            v_src, nv = strip_repeat_kv(v)
            if nk != nv:
                k_src, v_src, nk = k, v, 1
            ks = shape(k_src)
            if ks is None or len(ks) != 4 or ks[1] <= 0 or qs[1] % ks[1]:
                self.reject(node, "sdpa", f"query heads {qs[1]} not a multiple of key heads (key shape {ks})")
                continue
            enable_gqa = bool(node.kwargs.get("enable_gqa", False))
            scale = float(scale) if scale is not None else 1.0 / math.sqrt(qs[3])
            op_node = insert_attention(graph, node, q, k_src, v_src, mask, scale, is_causal, 0.0, MATH_SDPA)
            gqa = "repeat_kv removed" if nk > 1 else ("enable_gqa" if enable_gqa and ks[1] != qs[1] else "none")
            mask_desc = "mask tensor" if mask is not None else ("causal flag" if is_causal else "none")
            record = AttentionRecord(
                node=node.name, form="sdpa", rewritten=True, gqa=gqa, scale=scale, mask=mask_desc
            )
            self.accept(op_node, describe(record, q, k_src), replaced=node)
