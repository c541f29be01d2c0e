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

Weight changes: each concatenation is a ``FusedWeight`` that remembers its parts and their version counters. Every
call of the compiled graph checks them (``refresh``: a changed part — updated in place, or a replaced parameter —
is copied into the fused tensor in place, so its address, and any CUDA graph reading it, stays valid); the runtime
also calls ``refresh_fused_weights(model)`` at each ``generate``, since CUDA-graph replays skip that call.

Cost, said where the option is: a second copy of the fused weights. (Rebinding the parameters as views of the fused
tensor would avoid it, but then they share storage, which safetensors refuses to save.)
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

_LINEAR = (torch._C._nn.linear, F.linear)
_CACHE_ATTR = "_sparsespec_fused_cache"


class FuseProjectionsPass:
    name = "fuse_projections"

    def __init__(self) -> None:
        self.matched = 0  # groups fused
        self.notes: list[str] = []
        self.extra_inputs: list[torch.Tensor] = []  # appended to the graph's inputs, in this order
        self.fused: list[tuple[FusedWeight, list[int]]] = []  # each extra input and its parts' graph-input indices
        self._last_input: fx.Node | None = None
        self._index: dict[fx.Node, int] = {}  # original placeholder -> its position in the call's arguments

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[object]) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(example_inputs):
            self.notes.append(f"{self.name}: skipped ({len(placeholders)} graph inputs, {len(example_inputs)} "
                              "example inputs: cannot tell which inputs are parameters)")
            return
        value = dict(zip(placeholders, example_inputs))
        self._index = {n: i for i, n in enumerate(placeholders)}
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
        w_node = self._input(gm, f"sparsespec_fused_w{self.matched}", fused_weight(weights), [n.args[1] for n in nodes])
        b_node = None
        if biases[0] is not None:
            b_node = self._input(gm, f"sparsespec_fused_b{self.matched}", fused_weight(biases),
                                 [_bias(n) for n in nodes])
        with gm.graph.inserting_before(nodes[0]):
            fused = gm.graph.call_function(torch._C._nn.linear, (x, w_node, b_node))
            split = gm.graph.call_function(torch.split, (fused, [w.shape[0] for w in weights]), {"dim": -1})
            for i, n in enumerate(nodes):
                part = gm.graph.call_function(operator.getitem, (split, i))
                # A part is a column slice. HF's `.view(*input_shape, -1, head_dim)` of q/k/v only splits its last
                # dim, which a slice allows: no copy (for v, whose next consumer is the attention op, Inductor made
                # it a kernel of its own: one of the 3 pointwise kernels per layer in the H200 profile). Any other
                # use gets a dense tensor, as the model's code may assume (Inductor fuses that copy into pointwise
                # consumers).
                if not _only_splits_last_dim(n):
                    part = gm.graph.call_method("contiguous", (part,))
                n.replace_all_uses_with(part)
        for n in nodes:
            gm.graph.erase_node(n)
        self.matched += 1

    def _input(self, gm: fx.GraphModule, name: str, fw: "FusedWeight", sources: list[fx.Node]) -> fx.Node:
        """A new graph input after the last one, in ``extra_inputs`` order (the backend appends them to each call);
        ``sources``: the placeholders of its parts, whose call-time values ``refresh`` checks."""
        self.fused.append((fw, [self._index[n] for n in sources]))
        with gm.graph.inserting_after(self._last_input):
            self._last_input = gm.graph.placeholder(name)
        self.extra_inputs.append(fw.tensor)
        return self._last_input

    def refresh(self, args: Sequence[torch.Tensor]) -> None:
        """Before each call of the compiled graph: bring every fused tensor up to date with the weights passed in."""
        for fw, idx in self.fused:
            fw.refresh([args[i] for i in idx])


def _only_splits_last_dim(n: fx.Node) -> bool:
    """True if every use of ``n``'s value is a view / reshape that splits its last dim and keeps the others."""
    src = n.meta.get("example_value", n.meta.get("val"))
    if not isinstance(src, torch.Tensor) or not n.users:
        return False
    a = tuple(src.shape)
    for u in n.users:
        out = u.meta.get("example_value", u.meta.get("val"))
        if not (u.op == "call_method" and u.target in ("view", "reshape") and isinstance(out, torch.Tensor)):
            return False
        b = tuple(out.shape)
        if len(b) != len(a) + 1 or not all(statically_known_true(x == y) for x, y in zip(a[:-1], b[:-2])) \
                or not statically_known_true(b[-2] * b[-1] == a[-1]):
            return False
    return True


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


class FusedWeight:
    """The concatenation (dim 0, in order) of parameters that one fused GEMM reads, kept current in place."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = list(parts)
        with torch.no_grad():
            self.tensor = torch.cat([p.detach() for p in parts], 0)
        self.versions = [p._version for p in parts]

    def is_current(self, parts: Sequence[torch.Tensor]) -> bool:
        return all(a is b and a._version == v for a, b, v in zip(parts, self.parts, self.versions))

    def refresh(self, parts: Sequence[torch.Tensor] | None = None) -> bool:
        """Copy ``parts`` (default: the ones it was built from) in if any changed since: same storage, so graphs and
        CUDA graphs that read ``tensor`` see the new values. True if it copied."""
        parts = self.parts if parts is None else list(parts)
        if self.is_current(parts):
            return False
        shapes = [tuple(p.shape) for p in self.parts]
        if [tuple(p.shape) for p in parts] != shapes:
            raise RuntimeError(f"fuse_projections: a fused weight changed shape after the compile ({shapes} -> "
                               f"{[tuple(p.shape) for p in parts]}); recompile (torch._dynamo.reset()) after "
                               "reshaping weights")
        with torch.no_grad():
            torch.cat([p.detach() for p in parts], 0, out=self.tensor)
        self.parts, self.versions = parts, [p._version for p in parts]
        return True


def fused_weight(parts: list[torch.Tensor]) -> FusedWeight:
    """The ``FusedWeight`` of ``parts``, shared by every graph that fuses the same parameters (cached on the first
    one), brought up to date."""
    cache = getattr(parts[0], _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(parts[0], _CACHE_ATTR, cache)
    key = tuple(id(p) for p in parts)
    fw = cache.get(key)
    if fw is None or any(a is not b for a, b in zip(fw.parts, parts)):  # (an id reused by a new tensor)
        fw = cache[key] = FusedWeight(parts)
    fw.refresh(parts)
    return fw


def refresh_fused_weights(model: torch.nn.Module) -> int:
    """Bring every fused tensor built from ``model``'s parameters up to date (weights changed in place since);
    returns how many were copied. For callers that replay CUDA graphs, which skip the per-call check."""
    return sum(fw.refresh() for p in model.parameters() for fw in getattr(p, _CACHE_ATTR, {}).values())
