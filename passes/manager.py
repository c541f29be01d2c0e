"""PassManager: runs the attention passes in a fixed order, numbers the layers, removes dead code, reports."""

from __future__ import annotations

import logging

from torch import fx

from .base import GraphPass
from .cleanup import DeadCodePass
from .eager_attention import EagerAttentionPass
from .graph_utils import layer_index_from_names
from .report import RewriteReport
from .sdpa_attention import SDPAAttentionPass

log = logging.getLogger("sparsespec.passes")

LAYER_ARG = 4  # position of layer_idx in sparsespec::attention's schema


class PassManager:
    """``report = PassManager()(gm)`` rewrites ``gm`` in place and says what it did."""

    def __init__(self) -> None:
        self.attention_passes: list[GraphPass] = [SDPAAttentionPass(), EagerAttentionPass()]

    def __call__(self, gm: fx.GraphModule) -> RewriteReport:
        report = RewriteReport()
        rewrites = []
        for p in self.attention_passes:
            p(gm)
            report.passes.append((p.name, p.matched))
            report.records += p.records
            rewrites += p.rewrites
        self._number_layers(gm, rewrites, report)
        cleanup = DeadCodePass(set().union(*(p.dead_candidates for p in self.attention_passes)))
        cleanup(gm)
        report.passes.append((cleanup.name, cleanup.matched))
        report.removed_nodes = cleanup.matched
        gm.graph.lint()
        gm.recompile()
        log.info("%s", report)
        return report

    @staticmethod
    def _number_layers(gm: fx.GraphModule, rewrites, report: RewriteReport) -> None:
        """Layer index from the parameter names feeding each op (robust to graph breaks); graph order otherwise."""
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        rewrites = sorted(rewrites, key=lambda nr: order[nr[0]])
        by_name = [layer_index_from_names(node.args[0]) for node, _ in rewrites]
        use_names = None not in by_name and len(set(by_name)) == len(by_name)
        if rewrites and not use_names:
            report.notes.append(
                "layer indices taken from graph order: parameter names did not identify one layer per attention node"
            )
        for i, (node, record) in enumerate(rewrites):
            layer = by_name[i] if use_names else i
            args = list(node.args)
            args[LAYER_ARG] = layer
            node.args = tuple(args)
            record.layer_idx = layer
            record.layer_idx_source = "parameter name" if use_names else "graph order"
