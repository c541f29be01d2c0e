"""``torch.ops.sparsespec.attention``: the one node every matched attention subgraph becomes.

Two behaviours, chosen per call by whether the runtime has set a ForwardContext (see context.py):

* no context: exactly the attention the model computed before the rewrite (its mask, scale, softcap,
  GQA), in pure PyTorch, so a compiled model is a drop-in replacement;
* context set: the dual path — write the new tokens' K/V into the paged cache, attend per request with
  full attention (prefill / verify) or PillarAttn (draft), and refresh the pillars on verify rows.

Registered with ``torch.library.custom_op`` + ``register_fake`` rather than ``triton_op``: the latter breaks
under compile in the Triton interpreter that CI runs on, and dispatching inside keeps one op for CPU and GPU.
The op reads the KV pool and writes the pillar store through the context, not through its arguments (like
vLLM's ``unified_attention``): those buffers are persistent runtime state that must keep a fixed address for
CUDA graphs, and no graph value depends on them except through this op's output.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from .context import ForwardContext, get_forward_context

MATH_SDPA = "sdpa"  # the original called scaled_dot_product_attention
MATH_EAGER = "eager"  # the original was matmul -> scale -> (softcap) -> (+mask) -> softmax(fp32) -> matmul


@torch.library.custom_op("sparsespec::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    layer_idx: int,
    scale: float,
    is_causal: bool,
    softcap: float,
    math: str,
) -> torch.Tensor:
    """q: [B, Hq, S, D]; k, v: [B, Hkv, L, D] with Hq % Hkv == 0 (K/V *before* any repeat_kv).

    attn_mask: None, bool (True = attend) or additive float, broadcastable to [B, Hq, S, L].
    Returns [B, Hq, S, D] in q's dtype, laid out as [B, S, Hq, D] in memory (what SDPA returns and what
    the model's following ``transpose(1, 2).reshape(B, S, -1)`` wants, so that copy becomes free).
    """
    ctx = get_forward_context()
    if ctx is None:
        if _RECORDED is not None:
            _RECORDED.append(AttentionCall(layer_idx, q.shape[1], k.shape[1], k.shape[3]))
        out = _original_attention(q, k, v, attn_mask, scale, is_causal, softcap, math)
    else:
        out = _runtime_attention(ctx, q, k, v, layer_idx, scale, softcap)
    return _bshd_layout(out)


class AttentionCall(NamedTuple):
    """What one no-context call of the op received (``record_attention_calls``)."""

    layer_idx: int
    q_heads: int
    kv_heads: int  # == q_heads when the model expanded K/V to the query heads itself, in a form the pass kept
    head_dim: int


_RECORDED: list[AttentionCall] | None = None


@contextlib.contextmanager
def record_attention_calls() -> Iterator[list[AttentionCall]]:
    """``with record_attention_calls() as calls: compiled(x)``: the op calls of that forward (no context set), in
    call order. How ``LLM`` checks at construction that every layer was rewritten and what K/V shape it receives."""
    global _RECORDED
    if _RECORDED is not None:
        raise RuntimeError("record_attention_calls() is not re-entrant")
    _RECORDED = []
    try:
        yield _RECORDED
    finally:
        _RECORDED = None


@attention.register_fake
def _(q, k, v, attn_mask, layer_idx, scale, is_causal, softcap, math):
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2)


# ---- autograd: the original attention's backward (no context), so a rewritten model stays trainable ------------
# Written out by hand rather than recomputed under torch.autograd.grad: a custom op's body runs below the autograd
# dispatch key, and AOTAutograd traces this function into the joint graph (torch.compile with Inductor and grad on).


def _setup_attention_backward(ctx, inputs, output) -> None:
    q, k, v, attn_mask, _, scale, is_causal, softcap, math = inputs
    ctx.runtime = get_forward_context() is not None
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.scale, ctx.is_causal, ctx.softcap = scale, is_causal, softcap


def _attention_backward(ctx, grad):
    if ctx.runtime:
        raise RuntimeError("sparsespec::attention with a runtime ForwardContext (paged KV cache, sparse drafts) has "
                           "no backward: generate under torch.no_grad() / inference_mode (LLM does)")
    q, k, v, attn_mask = ctx.saved_tensors
    dq, dk, dv, dmask = _original_attention_backward(grad, q, k, v, attn_mask, ctx.scale, ctx.is_causal,
                                                     ctx.softcap, want_mask_grad=ctx.needs_input_grad[3])
    return dq, dk, dv, dmask, None, None, None, None, None


def _original_attention_backward(grad, q, k, v, attn_mask, scale, is_causal, softcap, want_mask_grad=False):
    """Gradients of ``_original_attention`` (either math form) w.r.t. q, k, v (and an additive float mask), in fp32.

    s = q k^T * scale; w = softcap * tanh(s / softcap) (if softcap); masked; p = softmax(w); out = p v.
    dv = p^T g; dw = p * (g v^T - rowsum(g v^T * p)); ds = dw * (1 - tanh^2) * scale; dq = ds k; dk = ds^T q.
    """
    b, hq, s_len, d = q.shape
    hkv, l_len = k.shape[1], k.shape[2]
    n_rep = hq // hkv
    qf, kf, vf, g = q.float(), _repeat_kv(k, n_rep).float(), _repeat_kv(v, n_rep).float(), grad.float()
    s = torch.matmul(qf, kf.transpose(2, 3)) * scale  # [B, Hq, S, L]
    t = None
    if softcap > 0.0:
        t = torch.tanh(s / softcap)
        s = t * softcap
    keep = None
    if is_causal:
        keep = torch.ones(s_len, l_len, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask if keep is None else keep & attn_mask
    if keep is not None:
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask.float()
    p = torch.softmax(s, dim=-1)
    dv = torch.matmul(p.transpose(2, 3), g)  # [B, Hq, L, D]
    dp = torch.matmul(g, vf.transpose(2, 3))  # [B, Hq, S, L]
    dw = p * (dp - (dp * p).sum(-1, keepdim=True))
    if keep is not None:
        dw = dw.masked_fill(~keep, 0.0)  # masked_fill passes no gradient to the filled scores
    dmask = None
    if want_mask_grad and attn_mask is not None and attn_mask.dtype != torch.bool:
        dmask = _sum_to(dw, attn_mask.shape).to(attn_mask.dtype)
    if t is not None:
        dw = dw * (1.0 - t * t)
    ds = dw * scale
    dq = torch.matmul(ds, kf)
    dk = torch.matmul(ds.transpose(2, 3), qf)

    def unrepeat(x):  # [B, Hq, L, D] -> [B, Hkv, L, D]: q head h read KV head h // n_rep
        return x.view(b, hkv, n_rep, l_len, d).sum(2) if n_rep > 1 else x

    return dq.to(q.dtype), unrepeat(dk).to(k.dtype), unrepeat(dv).to(v.dtype), dmask


def _sum_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``x`` over the dimensions a tensor of ``shape`` was broadcast along (the gradient of broadcasting)."""
    lead = x.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1]
    return x.sum(dims, keepdim=True).view(shape) if dims else x


attention.register_autograd(_attention_backward, setup_context=_setup_attention_backward)


def _bshd_layout(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    if x.stride() == (s * h * d, d, h * d, 1):
        return x
    out = x.new_empty(b, s, h, d).transpose(1, 2)
    out.copy_(x)
    return out


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # [B, Hkv, L, D] -> [B, Hkv * n_rep, L, D]; q head h reads KV head h // n_rep (HF's repeat_kv)
    if n_rep == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)


def _original_attention(q, k, v, attn_mask, scale, is_causal, softcap, math):
    n_rep = q.shape[1] // k.shape[1]
    if math == MATH_SDPA:
        return F.scaled_dot_product_attention(
            q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), attn_mask=attn_mask, is_causal=is_causal, scale=scale
        )
    if math != MATH_EAGER:
        raise ValueError(f"sparsespec::attention: unknown math {math!r}")
    # The same ops in the same order as transformers' eager_attention_forward, so fp32 results are bitwise equal.
    w = torch.matmul(q, _repeat_kv(k, n_rep).transpose(2, 3)) * scale
    if softcap > 0.0:
        w = torch.tanh(w / softcap) * softcap
    if is_causal:  # SDPA's convention: top-left aligned
        s, l = q.shape[-2], k.shape[-2]
        keep = torch.ones(s, l, dtype=torch.bool, device=q.device).tril()
        w = w.masked_fill(~keep, torch.finfo(w.dtype).min)
    if attn_mask is not None:
        w = w.masked_fill(~attn_mask, torch.finfo(w.dtype).min) if attn_mask.dtype == torch.bool else w + attn_mask
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, _repeat_kv(v, n_rep))


def _runtime_attention(ctx: ForwardContext, q, k, v, layer_idx, scale, softcap):
    from . import kernels  # kernels <- ops: imported lazily so the no-context path never loads Triton

    if q.shape[0] != 1:
        raise RuntimeError(
            f"sparsespec runtime expects a flattened ragged batch (batch dim 1), got q of shape {tuple(q.shape)}"
        )
    if not 0 <= layer_idx < len(ctx.kv.k):
        raise RuntimeError(f"attention layer {layer_idx} has no KV pool (the pool holds {len(ctx.kv.k)} layers)")
    ctx.attention_layers.append(layer_idx)
    q_t, k_t, v_t = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, H, D] views
    k_cache, v_cache = ctx.kv.k[layer_idx], ctx.kv.v[layer_idx]
    kernels.write_kv(k_cache, v_cache, k_t, v_t, ctx.slot_mapping, impl=ctx.impl)
    window = ctx.sliding_windows[layer_idx] if ctx.sliding_windows else -1
    pillar_idx = pillar_len = None
    if ctx.pillars is not None:
        # The kernel reads request r's pillars from row pillar_slot[r] of the store: no per-layer gather copy
        # (~12 MB per layer at 64 requests with a 6,144-token budget).
        pillar_idx = ctx.pillars.indices[layer_idx]  # [max_slots, Hkv, Bmax]
        pillar_len = ctx.pillars.lengths  # [max_slots]
    common = dict(
        query_start_loc=ctx.query_start_loc,
        seq_lens=ctx.seq_lens,
        block_tables=ctx.block_tables,
        scale=scale,
        softcap=softcap,
        sliding_window=window,
        impl=ctx.impl,
    )
    sparse = dict(
        is_sparse=ctx.is_sparse if ctx.pillars is not None else None,  # no pillar store: every row is full
        draft_start=ctx.draft_start,
        pillar_lengths=pillar_len,
        pillar_rows=ctx.pillar_slot if ctx.pillars is not None else None,
    )
    plan = None
    if ctx.impl == "triton":  # every layer of a step shares one work plan per sliding window
        plan = ctx.attention_plans.get(window)
        if plan is None:
            plan = ctx.attention_plans[window] = kernels.attention_plan(
                q_t, k_cache, query_start_loc=ctx.query_start_loc, seq_lens=ctx.seq_lens,
                max_query_len=ctx.max_query_len, sliding_window=window,
                max_pillars=pillar_idx.shape[2] if pillar_idx is not None else 0, **sparse)
    out, lse = kernels.unified_attention(
        q_t,
        k_cache,
        v_cache,
        max_query_len=ctx.max_query_len,
        max_seq_len=ctx.max_seq_len,
        pillar_indices=pillar_idx,
        return_lse=True,
        plan=plan,
        **sparse,
        **common,
    )
    if ctx.score_rows is not None and ctx.score_rows.numel() > 0 and ctx.pillars is not None:
        _refresh_pillars(ctx, kernels, q_t, k_cache, lse, layer_idx, common)
    return out.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]


def _refresh_pillars(ctx: ForwardContext, kernels, q_t, k_cache, lse, layer_idx, common) -> None:
    rows = ctx.score_rows
    if ctx.layer_scores is not None:  # deferred: select_step_pillars picks for all layers after the forward
        kernels.pillar_scores(q_t, k_cache, rows=rows, lse=lse, max_ctx=ctx.max_seq_len,
                              max_query_len=ctx.max_query_len, out=ctx.layer_scores[layer_idx], **common)
        return
    scores = kernels.pillar_scores(q_t, k_cache, rows=rows, lse=lse, max_ctx=ctx.max_seq_len,
                                   max_query_len=ctx.max_query_len, **common)  # [Rv, Hkv, L]
    # one layer at a time: a hybrid split per request would need every layer's scores, so it is per layer here
    idx, lengths = _select(ctx, scores[None], layer=layer_idx)
    slots = _score_slots(ctx)
    ctx.pillars.indices[layer_idx].index_copy_(0, slots, idx[0])
    if layer_idx == 0:  # the count is the same for every layer
        ctx.pillars.lengths.index_copy_(0, slots, lengths.to(ctx.pillars.lengths.dtype))


def _scored_context_lens(ctx: ForwardContext) -> torch.Tensor:
    q_lens = ctx.query_start_loc[1:] - ctx.query_start_loc[:-1]
    return (ctx.seq_lens - q_lens).index_select(0, ctx.score_rows)  # verified context before the verify chunk


def _score_slots(ctx: ForwardContext) -> torch.Tensor:
    return ctx.score_slots if ctx.score_slots is not None else ctx.pillar_slot.index_select(0, ctx.score_rows)


def select_step_pillars(ctx: ForwardContext) -> None:
    """After a forward run with ``ctx.layer_scores`` set: select every layer's pillars from its scores in one
    launch and write them to the PillarStore (what each layer does itself when ``layer_scores`` is None)."""
    if ctx.layer_scores is None or ctx.score_rows is None or ctx.score_rows.numel() == 0 or ctx.pillars is None:
        return
    L, Rv, H, N = ctx.layer_scores.shape
    idx, lengths = _select(ctx, ctx.layer_scores)
    slots = _score_slots(ctx)
    store = ctx.pillars.indices  # [L, S, H, B]
    flat = (torch.arange(L, device=slots.device)[:, None] * store.shape[1] + slots[None, :]).reshape(-1)
    store.view(-1, store.shape[2], store.shape[3]).index_copy_(0, flat, idx.view(L * Rv, H, -1))
    ctx.pillars.lengths.index_copy_(0, slots, lengths.to(ctx.pillars.lengths.dtype))


def _select(ctx: ForwardContext, scores: torch.Tensor, layer: int | None = None):
    """Next draft sets of the scored rows from ``scores: [L', Rv, Hkv, N]`` (L' layers): ``(indices [L', Rv, Hkv,
    max_budget], lengths [Rv])``; ``layer``: the one layer ``scores`` holds (else all of them). PillarAttn's top-B
    (``ctx.draft_split`` None) or the hybrid split (kernels/hybrid.py). With a recall buffer in the store, each
    layer's draft recall is written to it (the runtime's telemetry: device ops only, nothing read on the host)."""
    from .kernels.hybrid import draft_recall, draft_sets

    L, Rv, H, N = scores.shape
    recall = ctx.pillars.recall
    split = ctx.draft_split
    if layer is not None and split == "request":
        split = "layer"
    idx, lengths, mass = draft_sets(scores, _scored_context_lens(ctx), ctx.budget, ctx.recent, split,
                                    ctx.pillars.max_budget, impl=ctx.impl, need_mass=recall is not None)
    if recall is not None:
        r = draft_recall(scores.view(L * Rv, H, N), idx.view(L * Rv, H, -1), lengths.repeat(L),
                         mass[..., 2]).mean(-1).view(L, Rv)  # mean over KV heads
        (recall if layer is None else recall[layer:layer + 1]).index_copy_(1, _score_slots(ctx), r)
    return idx, lengths
