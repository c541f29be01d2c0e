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
        out = _original_attention(q, k, v, attn_mask, scale, is_causal, softcap, math)
    else:
        out = _runtime_attention(ctx, q, k, v, layer_idx, scale, softcap)
    return _bshd_layout(out)


@attention.register_fake
def _(q, k, v, attn_mask, layer_idx, scale, is_causal, softcap, math):
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).transpose(1, 2)


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
                              out=ctx.layer_scores[layer_idx], **common)
        return
    scores = kernels.pillar_scores(q_t, k_cache, rows=rows, lse=lse, max_ctx=ctx.max_seq_len, **common)  # [Rv, Hkv, L]
    idx, lengths = kernels.select_pillars(
        scores, _scored_context_lens(ctx), ctx.budget, recent=ctx.recent, max_budget=ctx.pillars.max_budget,
        impl=ctx.impl,
    )
    slots = _score_slots(ctx)
    ctx.pillars.indices[layer_idx].index_copy_(0, slots, idx)
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
    from . import kernels

    L, Rv, H, N = ctx.layer_scores.shape
    idx, lengths = kernels.select_pillars(
        ctx.layer_scores.view(L * Rv, H, N), _scored_context_lens(ctx).repeat(L), ctx.budget.repeat(L),
        recent=ctx.recent, max_budget=ctx.pillars.max_budget, impl=ctx.impl,
    )
    slots = _score_slots(ctx)
    store = ctx.pillars.indices  # [L, S, H, B]
    flat = (torch.arange(L, device=slots.device)[:, None] * store.shape[1] + slots[None, :]).reshape(-1)
    store.view(-1, store.shape[2], store.shape[3]).index_copy_(0, flat, idx)
    ctx.pillars.lengths.index_copy_(0, slots, lengths[:Rv].to(ctx.pillars.lengths.dtype))
