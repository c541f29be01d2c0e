"""Rewrite HF's eager attention (matmul → scale → softcap → +mask → softmax → dropout(eval) → matmul).

Anchored on each softmax over the last dim; the chain is walked both ways and every intermediate must have
exactly one user (attention probabilities or scores used elsewhere — e.g. ``output_attentions`` — mean the
subgraph is left alone, with that reason in the report).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from ..ops import MATH_EAGER
from .base import GraphPass, describe, insert_attention
from .graph_utils import arg, is_call, is_const_number, shape, single_user, strip_repeat_kv
from .report import AttentionRecord

SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax, "softmax")
MATMUL = (torch.matmul, operator.matmul, "matmul")
CASTS = ("to", "type", "float")
DROPOUT = (F.dropout, torch.dropout)
MUL = (operator.mul, torch.mul, "mul")
DIV = (operator.truediv, torch.div, "div")
ADD = (operator.add, torch.add, "add")
TANH = (torch.tanh, "tanh")


class NoMatch(Exception):
    """A candidate is not (supported) eager attention; the message is the report's reason."""


class EagerAttentionPass(GraphPass):
    name = "eager_attention"

    def __call__(self, gm: fx.GraphModule) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            if not is_call(node, *SOFTMAX):
                continue
            try:
                out, v = self._forward(node)
                q, k, scale, softcap, mask = self._backward(node)
            except NoMatch as exc:
                self.reject(node, "softmax", str(exc))
                continue
            k_src, nk = strip_repeat_kv(k)
            v_src, nv = strip_repeat_kv(v)
            if nk != nv:
                k_src, v_src, nk = k, v, 1
            qs, ks = shape(q), shape(k_src)
            if not (qs and ks and len(qs) == 4 and len(ks) == 4 and ks[1] > 0 and qs[1] % ks[1] == 0):
                self.reject(node, "eager", f"query/key are not [batch, heads, seq, head_dim] (q {qs}, k {ks})")
                continue
            op_node = insert_attention(graph, out, q, k_src, v_src, mask, scale, False, softcap, MATH_EAGER)
            record = AttentionRecord(
                node=out.name,
                form="eager",
                rewritten=True,
                gqa="repeat_kv removed" if nk > 1 else "none",
                scale=scale,
                mask="mask tensor" if mask is not None else "none",
                softcap=softcap,
            )
            self.accept(op_node, describe(record, q, k_src), replaced=out)

    @staticmethod
    def _forward(softmax: fx.Node) -> tuple[fx.Node, fx.Node]:
        """softmax → (cast) → (dropout in eval) → matmul(P, V); returns (matmul node, V)."""
        dim = arg(softmax, 1, "dim")
        rank = len(shape(softmax) or ())
        if dim not in (-1, rank - 1):
            raise NoMatch(f"softmax over dim {dim}, not the key dim")
        node = softmax
        while True:
            user = single_user(node)
            if user is None:
                raise NoMatch("attention probabilities have several users (output_attentions?)")
            if is_call(user, *CASTS) and user.args[0] is node:
                node = user
            elif is_call(user, *DROPOUT):
                training = arg(user, 2, "training", True)
                if training is not False:
                    raise NoMatch("dropout in training mode")
                node = user
            elif is_call(user, *MATMUL) and user.args[0] is node:
                return user, user.args[1]
            else:
                raise NoMatch(f"softmax output feeds {user.target} rather than a matmul with V")

    @staticmethod
    def _backward(softmax: fx.Node) -> tuple[fx.Node, fx.Node, float, float, fx.Node | None]:
        """(+mask) ← (softcap) ← (scale) ← matmul(Q, K^T); returns (Q, K, scale, softcap, mask)."""
        node = softmax.args[0]
        mask = None
        if is_call(node, *ADD) and len(node.args) == 2:
            a, b = node.args
            if _scores_chain(a):
                node, mask = a, b
            elif _scores_chain(b):
                node, mask = b, a
            else:
                raise NoMatch("softmax input is an add that is not scores + mask")
            if not isinstance(mask, fx.Node):
                raise NoMatch("mask added to the scores is not a tensor")
            _only_user(node)
        softcap = 0.0
        if is_call(node, *MUL) and is_call(node.args[0], *TANH):
            tanh = node.args[0]
            inner = tanh.args[0]
            c = node.args[1]
            if not (is_call(inner, *DIV) and is_const_number(c) and inner.args[1] == c):
                raise NoMatch("tanh on the scores is not a softcap (x / c).tanh() * c")
            softcap = float(c)
            _only_user(inner)
            node = inner.args[0]
            _only_user(node)
        scale = 1.0
        if is_call(node, *MUL, *DIV):
            c = node.args[1]
            if not is_const_number(c):
                raise NoMatch("attention scale is a tensor, not a constant")
            scale = float(c) if is_call(node, *MUL) else 1.0 / float(c)
            node = node.args[0]
            _only_user(node)
        if not is_call(node, *MATMUL):
            raise NoMatch("softmax input is not derived from matmul(Q, K^T)")
        q, kt = node.args[:2]
        if not (is_call(kt, "transpose") and set(kt.args[1:3]) in ({2, 3}, {-1, -2}, {-2, 3}, {2, -1})):
            raise NoMatch("second matmul operand is not K transposed over its last two dims")
        _only_user(kt)
        return q, kt.args[0], scale, softcap, mask


def _scores_chain(node: object) -> bool:
    """Does ``node`` look like (softcapped, scaled) Q·K^T?"""
    for _ in range(6):  # (tanh(((Q·K^T) * scale) / c)) * c is five calls deep
        if is_call(node, *MATMUL):
            return True
        if not is_call(node, *MUL, *DIV, *TANH):
            return False
        node = node.args[0]
    return False


def _only_user(node: fx.Node) -> None:
    if len(node.users) != 1:
        raise NoMatch(f"intermediate scores {node.name} have several users")
