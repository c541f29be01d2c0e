"""Small FX helpers shared by the attention passes: node predicates, constants, shapes, layer indices."""

from __future__ import annotations

import operator
import re
from collections import deque
from typing import Any, Iterable

import torch
from torch import fx

_LAYER_NAME = re.compile(r"(?:^|_)(?:layers|layer|h|blocks|block)_(?:modules_)?(\d+)_")


def is_call(node: Any, *targets: Any) -> bool:
    """True if ``node`` calls one of ``targets``: functions (call_function) or method names (call_method)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def shape(node: Any) -> tuple[int, ...] | None:
    """Shape of a Dynamo node from its example value: ints, with -1 for symbolic (dynamic) sizes.

    Never calls ``int()`` on a SymInt: that would add a guard and specialise the graph to one token count.
    """
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(s if type(s) is int else -1 for s in val.shape)


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_const_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def strip_repeat_kv(node: Any) -> tuple[Any, int]:
    """If ``node`` is HF's ``repeat_kv(x, n)`` (``x[:, :, None].expand(...).reshape(...)`` or
    ``repeat_interleave(x, n, dim=1)``), return ``(x, n)``; otherwise ``(node, 1)``."""
    if is_call(node, "reshape", torch.reshape, "view"):
        expand = node.args[0]
        if is_call(expand, "expand") and len(expand.users) == 1:
            src = expand.args[0]
            if is_call(src, operator.getitem) and _is_unsqueeze_2(src.args[1]):
                x = src.args[0]
                xs, out = shape(x), shape(node)
                if xs and out and len(xs) == 4 and len(out) == 4 and xs[1] > 0 and out[1] % xs[1] == 0:
                    return x, out[1] // xs[1]
    if is_call(node, torch.repeat_interleave, "repeat_interleave"):
        dim = arg(node, 2, "dim")
        reps = arg(node, 1, "repeats")
        if dim == 1 and isinstance(reps, int):
            return node.args[0], reps
    return node, 1


def _is_unsqueeze_2(index: Any) -> bool:
    # x[:, :, None, :, :] or x[:, :, None]
    if not isinstance(index, tuple) or len(index) < 3:
        return False
    full = slice(None, None, None)
    return index[0] == full and index[1] == full and index[2] is None and all(i == full for i in index[3:])


def layer_index_from_names(start: fx.Node, max_nodes: int = 64) -> int | None:
    """Layer number of the nearest parameter feeding ``start`` (e.g. ``...layers_modules_3_...q_proj...``).

    Dynamo names lifted parameters after their module path, so the closest projection weight names the layer.
    """
    seen: set[fx.Node] = set()
    queue: deque[fx.Node] = deque([start])
    while queue and len(seen) < max_nodes:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        if node.op in ("placeholder", "get_attr"):
            match = _LAYER_NAME.search(str(node.target))
            if match:
                return int(match.group(1))
            continue
        queue.extend(n for n in node.all_input_nodes if n not in seen)
    return None


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    out: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack.extend(n.all_input_nodes)
    return out
