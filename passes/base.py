"""The one shape every pass has: ``name``, ``matched`` counter, ``__call__(gm)``, records for the report."""

from __future__ import annotations

import abc
import logging

import torch
from torch import fx

from .graph_utils import ancestors, shape
from .report import AttentionRecord

log = logging.getLogger("sparsespec.passes")

LAYER_UNSET = -1  # filled in by the manager once every attention node of the graph is known


class GraphPass(abc.ABC):
    name = "pass"

    def __init__(self) -> None:
        self.matched = 0
        self.records: list[AttentionRecord] = []
        self.rewrites: list[tuple[fx.Node, AttentionRecord]] = []  # (new op node, its record)
        # Nodes of the replaced subgraphs and their inputs: the only nodes DeadCodePass may remove.
        self.dead_candidates: set[fx.Node] = set()

    @abc.abstractmethod
    def __call__(self, gm: fx.GraphModule) -> None:
        """Rewrite ``gm`` in place, counting matches in ``self.matched``."""

    def accept(self, op_node: fx.Node, record: AttentionRecord, replaced: fx.Node) -> None:
        self.matched += 1
        self.dead_candidates |= ancestors([replaced])
        self.records.append(record)
        self.rewrites.append((op_node, record))

    def reject(self, node: fx.Node, form: str, reason: str) -> None:
        log.info("%s: left %s alone: %s", self.name, node.name, reason)
        self.records.append(AttentionRecord(node=node.name, form=form, rewritten=False, reason=reason))


def insert_attention(
    graph: fx.Graph,
    out: fx.Node,
    q: fx.Node,
    k: fx.Node,
    v: fx.Node,
    mask: fx.Node | None,
    scale: float,
    is_causal: bool,
    softcap: float,
    math: str,
) -> fx.Node:
    """Replace every use of ``out`` (the original attention output) by one ``sparsespec::attention`` node."""
    with graph.inserting_before(out):
        node = graph.call_function(
            torch.ops.sparsespec.attention.default,
            args=(q, k, v, mask, LAYER_UNSET, float(scale), bool(is_causal), float(softcap), math),
        )
    for key in ("example_value", "val"):
        if key in out.meta:
            node.meta[key] = out.meta[key]
    node.meta["stack_trace"] = out.meta.get("stack_trace")
    node.meta["sparsespec_replaced"] = out.name
    out.replace_all_uses_with(node)
    return node


def describe(record: AttentionRecord, q: fx.Node, k: fx.Node) -> AttentionRecord:
    qs, ks = shape(q), shape(k)
    if qs and len(qs) == 4:
        record.q_heads, record.head_dim = qs[1], qs[3]
    if ks and len(ks) == 4:
        record.kv_heads = ks[1]
    return record
