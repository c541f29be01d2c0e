"""Remove what the rewrite made dead (repeat_kv expands, unused masks and score chains) — and nothing else."""

from __future__ import annotations

from torch import fx

from .base import GraphPass

_REMOVABLE_OPS = ("call_function", "call_method")


class DeadCodePass(GraphPass):
    """Erase nodes of replaced attention subgraphs that lost their last user.

    Restricted to the passes' ``dead_candidates`` rather than ``graph.eliminate_dead_code()``: a graph-wide DCE also
    erased HF StaticCache's in-place ``keys.index_copy_(...)`` (a call_method with no users), breaking
    generation with a static cache.
    """

    name = "dead_code"

    def __init__(self, candidates: set[fx.Node]) -> None:
        super().__init__()
        self.candidates = candidates

    def __call__(self, gm: fx.GraphModule) -> None:
        candidates = self.candidates
        removed = 0
        for node in reversed(list(gm.graph.nodes)):  # users before producers: whole chains go in one sweep
            if node in candidates and not node.users and node.op in _REMOVABLE_OPS and not node.is_impure():
                target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
                if target.endswith("_"):  # an in-place method or op: keep its side effect
                    continue
                gm.graph.erase_node(node)
                removed += 1
        self.matched = removed
