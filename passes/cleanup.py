"""Remove what the rewrite made dead (repeat_kv expands, unused masks and score chains)."""

from __future__ import annotations

from torch import fx

from .base import GraphPass


class DeadCodePass(GraphPass):
    name = "dead_code"

    def __call__(self, gm: fx.GraphModule) -> None:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        self.matched = before - len(gm.graph.nodes)
