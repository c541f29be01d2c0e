"""FuseProjectionsPass: linear layers that read one input with parameter weights become one GEMM (q/k/v, gate/up).

Why: a decode step of a small model is bound by its kernel launches, not its bytes. On the H200 a SmolLM2 step ran
210 GEMM launches (7 per layer, 3.2-3.9 us each: 0.77 ms of a 2.7 ms step) to read 0.06 ms worth of weights
(bench/RESULTS.md). Merging q/k/v and gate/up leaves 4 per layer. Inductor's own concat-linear pattern (under
``freezing``) did not fire on these graphs: 575 kernels per step either way.

How: Dynamo lifts parameters to graph inputs, and the backend receives the real tensors as example inputs. For
every group of ``linear(x, W_i, b_i)`` with the same ``x`` and parameter weights of one dtype/device/in-features,
the pass concatenates the weights (and biases) once and replaces the group by one ``linear`` followed by a split.
The concatenations become extra graph inputs (``self.extra_inputs``; the backend appends them to every call): a
constant attribute on the GraphModule is refused by AOTAutograd for Dynamo graphs. The concatenated copy is cached
on the first weight, so recompiles of the same model share it.

Costs, said where the option is: a second copy of the fused weights, and weights changed in place after the compile
are not seen (the cache key includes each weight's version counter, so a recompile after a change re-concatenates).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx

_LINEAR = (torch._C._nn.linear, F.linear)
_CACHE_ATTR = "_sparsespec_fused_cache"


class FuseProjectionsPass:
    name = "fuse_projections"

    def __init__(self) -> None:
        self.matched = 0  # groups fused
        self.notes: list[str] = []
        self.extra_inputs: list[torch.Tensor] = []  # appended to the graph's inputs, in this order
        self._last_input: fx.Node | None = None

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[object]) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            self.notes.append(f"{self.name}: skipped ({len(placeholders)} graph inputs, {len(example_inputs)} "
                              "example inputs: cannot tell which inputs are parameters)")
            return
        value = dict(zip(placeholders, example_inputs))
        self._last_input = placeholders[-1] if placeholders else None
        groups: dict[fx.Node, list[tuple[fx.Node, torch.Tensor, torch.Tensor | None]]] = defaultdict(list)
        for n in gm.graph.nodes:  # graph order: each group's first node is where the fused GEMM goes
            parts = _linear_parts(n, value)
            if parts is not None:
                groups[parts[0]].append((n, *parts[1:]))
        for x, group in groups.items():
            if len(group) < 2:
                continue
            why = _incompatible(group)
            if why:
                self.notes.append(f"{self.name}: left {[n.name for n, _, _ in group]} apart: {why}")
                continue
            self._fuse(gm, x, group)

    def _fuse(self, gm: fx.GraphModule, x: fx.Node, group: list[tuple]) -> None:
        nodes, weights, biases = (list(c) for c in zip(*group))
        w_cat, b_cat = _concatenated(weights, biases)
        w_node = self._input(gm, f"sparsespec_fused_w{self.matched}", w_cat)
        b_node = self._input(gm, f"sparsespec_fused_b{self.matched}", b_cat) if b_cat is not None else None
        with gm.graph.inserting_before(nodes[0]):
            fused = gm.graph.call_function(torch._C._nn.linear, (x, w_node, b_node))
            split = gm.graph.call_function(torch.split, (fused, [w.shape[0] for w in weights]), {"dim": -1})
            for i, n in enumerate(nodes):
                part = gm.graph.call_function(operator.getitem, (split, i))
                # contiguous: the model's own .view() of each projection assumes a dense tensor (Inductor fuses
                # the copy into the consumer)
                n.replace_all_uses_with(gm.graph.call_method("contiguous", (part,)))
        for n in nodes:
            gm.graph.erase_node(n)
        self.matched += 1

    def _input(self, gm: fx.GraphModule, name: str, t: torch.Tensor) -> fx.Node:
        """A new graph input after the last one, in ``extra_inputs`` order (the backend appends them to each call)."""
        with gm.graph.inserting_after(self._last_input):
            self._last_input = gm.graph.placeholder(name)
        self.extra_inputs.append(t)
        return self._last_input


def _bias(n: fx.Node):
    return n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")


def _linear_parts(n: fx.Node, value: dict):
    """(input node, weight tensor, bias tensor or None) of a linear whose weight (and bias) are parameters."""
    if n.op != "call_function" or n.target not in _LINEAR or len(n.args) < 2:
        return None
    if set(n.kwargs) - {"bias"}:
        return None
    x, w, b = n.args[0], n.args[1], _bias(n)
    if not isinstance(x, fx.Node) or not isinstance(value.get(w), torch.nn.Parameter):
        return None
    if b is not None and not isinstance(value.get(b), torch.nn.Parameter):
        return None
    return x, value[w], value.get(b) if b is not None else None


def _incompatible(group: list[tuple]) -> str | None:
    ws = [w for _, w, _ in group]
    if len({(w.dtype, w.device, w.dim(), w.shape[-1]) for w in ws}) != 1 or ws[0].dim() != 2:
        return "weights differ in dtype, device or in-features"
    if len({b is None for _, _, b in group}) != 1:
        return "some have a bias and some do not"
    if len({id(w) for w in ws}) != len(ws):
        return "a weight appears twice"
    return None


def _concatenated(weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
    key = tuple((id(w), w._version) for w in weights) + tuple((id(b), b._version) for b in biases if b is not None)
    cache = getattr(weights[0], _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(weights[0], _CACHE_ATTR, cache)
    if key not in cache:
        cache.clear()  # an older concatenation of these weights (changed since) is dead
        with torch.no_grad():
            w_cat = torch.cat([w.detach() for w in weights], 0)
            b_cat = torch.cat([b.detach() for b in biases], 0) if biases[0] is not None else None
        cache[key] = (w_cat, b_cat)
    return cache[key]
