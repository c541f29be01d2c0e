"""Greedy agreement between two runs of one cell: where each request's tokens first differ, and the target model's
logit margin there (a near-tie parts bf16 runs with differently shaped kernels; a large gap would be a bug)."""

from __future__ import annotations

import torch


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First position where two outputs differ over their common length (None: identical there)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def compare(tokens: list[list[int]], ref: list[list[int]]) -> dict:
    first = [first_divergence(a, b) for a, b in zip(tokens, ref)]
    return {"identical": sum(f is None for f in first), "requests": len(first), "first_divergence": first,
            "compared_tokens": min(len(tokens[0]), len(ref[0])) if tokens and ref else 0}


@torch.inference_mode()
def divergence_margins(model, prompts, tokens, ref_tokens, first, limit: int = 16) -> list[dict]:
    """For the first ``limit`` divergent requests: the uncompiled model's logits after the reference's prefix, as
    ``margin`` (top-1 − top-2) and ``gap`` (logit of the reference's token − logit of the other run's token). A
    near-zero gap says the runs parted at a near-tie (bf16 rounding of differently shaped kernels), a large one would
    be a bug."""
    dev = next(model.parameters()).device
    out = []
    for i, d in enumerate(first):
        if d is None or len(out) >= limit:
            continue
        ids = torch.tensor([list(prompts[i]) + list(ref_tokens[i][:d])], device=dev)
        logits = model(ids).logits[0, -1].float()
        top = logits.topk(2).values
        out.append({"request": i, "position": d, "margin": float(top[0] - top[1]),
                    "gap": float(logits[ref_tokens[i][d]] - logits[tokens[i][d]])})
    return out


def add_comparisons(rec: dict, group: dict[str, dict], model=None, prompts=None) -> None:
    """Greedy agreement over the common length: drafts vs stride 0 (speculation is lossless), stride 0 and HF static
    vs HF eager (same model, other kernels and padding); with ``model``, the logit margins where they part."""
    if rec["temperature"] != 0 or rec.get("status") != "ok":
        return
    ref = {"sparsespec": "stride0", "pillar": "stride0", "streaming": "stride0", "hybrid": "stride0", "stride0": "hf_eager",
           "hf_static_compile": "hf_eager"}
    other = group.get(ref.get(rec["method"], ""))
    rec["greedy_vs"] = {}
    if other and other.get("status") == "ok":  # the reference ran earlier in the same group
        c = compare(rec["tokens"], other["tokens"])
        if model is not None and prompts is not None:
            c["margins"] = divergence_margins(model, prompts, rec["tokens"], other["tokens"], c["first_divergence"])
        rec["greedy_vs"][ref[rec["method"]]] = c
