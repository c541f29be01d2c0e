"""Exact greedy replay of draft acceptance on real weights, fast enough for the CPU: pillar vs streaming vs hybrid.

The runtime on this 2-core CPU runs SmolLM2 at ~3 tokens/s (bench/acceptance.py: a 16 x 512 comparison of three
drafts takes most of an hour), too slow to try split ideas. This replays the same draft sets in two forwards per
prompt, using the runtime's own selection code (kernels/hybrid.py, kernels/pillars.py, reference impl):

1. HF greedy generation (fp32) of ``--max-tokens`` tokens: the target path ``y``.
2. One full causal forward over ``y`` that records, per layer, the pillar scores of every cycle: the verify
   queries ``[v, v + k]`` averaged over the GQA group and the queries, on the context ``< v`` (what
   ``kernels.pillar_scores`` computes; cycles start every k + 1 tokens after the prompt).
3. Per draft method, one forward over ``y`` plus, for every cycle, a copy of its k draft tokens (positions
   ``v + k + 1 .. v + 2k``, the cycle after a fully accepted one) whose queries attend only the draft set
   (positions ``< v``, per layer and KV head) and the dense tail ``[v, q]``, exactly as a draft step does.
   The copies' keys and values come from the sparse pass, like drafted tokens' KV in the cache.

A draft accepts while its argmax equals the next target token (teacher forcing is exact for the accepted prefix:
the inputs of an accepted draft are the target tokens). Assumed: the cycle before each was fully accepted (its
verify chunk is target tokens; in the runtime a rejected chunk holds the rejected drafts). Greedy only.

It is a screen, not the measurement. Cycles here sit every k + 1 tokens (a mean over positions); the runtime's mean
is over its cycles, and a hard stretch of text gets more of them. Against bench/acceptance.py on the same 8 prompts x
384 tokens (B 32, recent 4, T 0): PillarAttn 4.83 here vs 4.68 there, hybrid 5.22 vs 4.55, but streaming 4.88 vs
2.78 (its low-acceptance stretches are many short cycles there). It also ranked a change wrongly: successor
ranking (``,reach=4``) gained 0.4 here and lost 0.2-0.3 in the runtime (successor_scores). Confirm a
winner with bench/acceptance.py.

    python -m bench.draft_replay --num-prompts 8 --max-tokens 384 --min-budget 32 --recent 4 \\
        --drafts pillar streaming hybrid
    python -m bench.draft_replay --smoke          # 1 prompt, 40 tokens, budget 8: seconds after the model loads
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench.acceptance import load_prompts
from sparsespec_compile.kernels.hybrid import draft_mass, draft_sets
from sparsespec_compile.models import EMBEDDED, load_embedded

# method -> the split draft_sets takes (None: PillarAttn; 1.0 is exactly the streaming draft's sinks + window,
# tests/kernels/test_hybrid.py; "hybrid" takes --hybrid-split)
METHODS = {"pillar": None, "streaming": 1.0, "hybrid": "split"}


def successor_scores(scores: torch.Tensor, reach: int) -> torch.Tensor:
    """``key[t] = max_{0 <= j <= reach} scores[t - j]`` over the last dim (``-inf`` stays ``-inf``): the ranking of
    scored drafts' pillars, ranked by it before :func:`draft_sets` selects them (the hybrid split's mass then
    reads these keys too). An experiment of this replay only; the runtime does not use it.

    Why: a head that copies (an induction head) attends the token *after* the source of the current one, so from
    one query to the next its attention moves one position forward. The verify queries' scores mark where it
    looked; the next cycle's drafts look ``1..k`` positions further. Ranking a position by its best predecessor
    within ``reach`` keeps those successors. The replay (bench/draft_replay.py, SmolLM2, 8 GSM8K x 384 tokens, B 32,
    T 0) liked it: PillarAttn 4.83 -> 5.23 of 8 with reach 4, the hybrid 5.22 -> 5.35. The runtime did not
    (bench/acceptance.py, same prompts and budget, a runtime knob since removed): PillarAttn 4.68 -> 4.34, the
    hybrid 4.55 -> 4.37, draft recall 0.87 -> 0.80. Likely why: the replay's cycles all follow a fully accepted one
    (the drafts start k + 1 past the verify chunk), the runtime's start a + 1 past it, so the runs of successors
    mostly spend budget the verify scores would have spent better."""
    if reach <= 0:
        return scores
    out = scores.clone()
    for j in range(1, reach + 1):
        out[..., j:] = torch.maximum(out[..., j:], scores[..., :-j])
    return torch.where(torch.isneginf(scores), scores, out)  # positions past the context stay -inf


def parse_method(spec: str, default_split):
    """``name[,key=value...]``: name in METHODS or ``share`` (a fixed split, ``share=0.5``); keys ``split``
    (request / layer / a number) and ``reach`` (successor_scores)."""
    name, *opts = spec.split(",")
    kw = dict(o.split("=") for o in opts)
    split = kw.pop("split", None)
    if name == "share":
        split = float(kw.pop("share"))
    elif name not in METHODS:
        raise SystemExit(f"unknown draft {spec!r}: one of {list(METHODS)} or share,share=X")
    elif split is None:
        split = default_split if METHODS[name] == "split" else METHODS[name]
    if isinstance(split, str) and split not in ("request", "layer"):
        split = float(split)
    out = {"reach": int(kw.pop("reach", 0))}
    if kw:
        raise SystemExit(f"unknown option(s) {sorted(kw)} in {spec!r}")
    return split, out


class _Capture:
    """The attention function of both forwards (one HF attention interface, switched by ``mode``)."""

    def __init__(self, n_orig: int, verify_starts: list[int], stride: int):
        self.n, self.v, self.k = n_orig, torch.tensor(verify_starts), stride
        self.mode, self.scores, self.masks = "score", {}, None

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        B, Hq, Tq, D = query.shape
        Hkv = key.shape[1]
        G = Hq // Hkv
        k = key.repeat_interleave(G, dim=1)
        v = value.repeat_interleave(G, dim=1)
        logits = torch.matmul(query, k.transpose(2, 3)) * scaling  # [1, Hq, Tq, Tk]
        allowed = self._allowed(module.layer_idx, Tq, key.shape[2], Hq, G, query.device)
        p = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
        if self.mode == "score":
            self.scores[module.layer_idx] = self._cycle_scores(p[0], Hkv, G)
        out = torch.matmul(p, v).transpose(1, 2).contiguous()
        return out, None

    def _allowed(self, layer: int, Tq: int, Tk: int, Hq: int, G: int, dev) -> torch.Tensor:
        """Score mode: the N target tokens, causal. Draft mode: the queries are the cycles' draft copies only (the
        target tokens' keys and values are the score forward's, from its cache), ``Tk = N + Tq``."""
        n, k = self.n, self.k
        causal = torch.ones(max(Tq, k), max(Tq, k), dtype=torch.bool, device=dev).tril()
        if self.mode == "score":
            return causal[None, None, :Tq, :Tk]
        allowed = torch.zeros(Hq, Tq, Tk, dtype=torch.bool, device=dev)
        for c, vc in enumerate(self.v.tolist()):
            s = c * k  # this cycle's k draft copies: query rows s .. s + k - 1, key columns n + s ..
            sel = self.masks[layer][c].repeat_interleave(G, dim=0)  # [Hq, n] draft set (positions < v)
            allowed[:, s:s + k, :n] = sel[:, None, :]
            allowed[:, s:s + k, vc:vc + k + 1] = True  # the dense tail: the verified chunk [v, v + k]
            allowed[:, s:s + k, n + s:n + s + k] = causal[:k, :k]  # and the cycle's own drafts
        return allowed[None]

    def _cycle_scores(self, p: torch.Tensor, Hkv: int, G: int) -> torch.Tensor:
        n, k = self.n, self.k
        out = torch.full((len(self.v), Hkv, n), -math.inf)
        for c, vc in enumerate(self.v.tolist()):
            rows = p[:, vc:vc + k + 1, :vc]  # [Hq, k + 1, vc]
            out[c, :, :vc] = rows.reshape(Hkv, G, k + 1, vc).mean(dim=(1, 2))
        return out


def target_paths(model, prompts: list[list[int]], max_tokens: int, cache: Path | None) -> list[torch.Tensor]:
    """Prompt + ``max_tokens`` greedy tokens per prompt (EOS masked, like the runtime's ``ignore_eos``), generated in
    one left-padded batch (decoding here is weight-bound: 8 prompts cost about what one does), kept in ``cache``.
    Only the path: acceptance is judged against the full forward's own argmax after each prefix of it."""
    key = f"{model.config._name_or_path}|{max_tokens}|" + ";".join(",".join(map(str, p)) for p in prompts)
    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        if stored["key"] == key:
            return [torch.tensor(p) for p in stored["paths"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
    paths = [torch.cat([torch.tensor(p), gen[i, width:]]) for i, p in enumerate(prompts)]
    if cache is not None:
        cache.write_text(json.dumps({"key": key, "paths": [p.tolist() for p in paths]}))
    return paths


def replay_prompt(model, ids: list[int], y: torch.Tensor, args, methods: list[str], tok_eos=None) -> dict:
    """Accepted drafts per cycle of one prompt (``y``: its target path), per method; ``tok_eos``: EOS ids, masked
    in the argmaxes as in the generation."""
    from transformers import AttentionInterface

    k = args.stride
    n = y.shape[0]
    starts = list(range(len(ids), n - 2 * k - 1, k + 1))  # verify chunks; each cycle's drafts need 2k + 2 tokens
    cap = _Capture(n, starts, k)
    AttentionInterface.register("draft_replay", cap)
    old = model.config._attn_implementation
    model.set_attn_implementation("draft_replay")
    try:
        with torch.no_grad():
            out = model(y[None], use_cache=True)
        cache = out.past_key_values  # the target tokens' KV (full attention), shared by every method's drafts
        logits = out.logits[0]
        if tok_eos is not None:  # generate ran with min_new_tokens (EOS masked): mask it here too
            logits[:, tok_eos] = -math.inf
        full = logits.argmax(-1)  # the target's greedy token after each prefix of y: what verification accepts
        flips = int((full[len(ids) - 1:-1] != y[len(ids):]).sum())  # fp32 near-ties between SDPA and this path
        scores = torch.stack([cap.scores[l] for l in range(len(cap.scores))])  # [L, C, Hkv, n]
        ctx = torch.tensor(starts)
        budget = torch.tensor([min(max(args.min_budget, math.ceil(args.sparsity * c)), c) for c in starts])
        inp = torch.cat([y[v + k + 1:v + 2 * k + 1] for v in starts])
        pid = torch.cat([torch.arange(v + k + 1, v + 2 * k + 1) for v in starts])
        target = torch.stack([full[v + k + 1:v + 2 * k + 1] for v in starts])  # [C, k]
        result = {"flips": flips, "cycles": len(starts)}
        # each cycle's window share as the request split reads it (kernels/hybrid.hybrid_split): mass in the newest
        # b - sinks positions over the mass outside the sinks, all layers and heads: to fit a split rule offline
        m = draft_mass(scores.flatten(0, 1), ctx.repeat(scores.shape[0]), budget.repeat(scores.shape[0]),
                       impl="reference").view(scores.shape[0], len(starts), -1, 3).sum(dim=(0, 2))  # [C, 3]
        result["window_share"] = (m[:, 1] / (m[:, 2] - m[:, 0]).clamp(min=1e-12)).tolist()
        result["sink_share"] = (m[:, 0] / m[:, 2].clamp(min=1e-12)).tolist()
        for m in methods:
            split, kw = parse_method(m, args.hybrid_split)
            reach = kw.pop("reach", 0)
            idx, lengths, _ = draft_sets(successor_scores(scores, reach), ctx, budget, args.recent, split,
                                         int(budget.max()), impl="reference", **kw)
            keep = torch.arange(idx.shape[-1])[None, None, None, :] < lengths[None, :, None, None]
            masks = torch.zeros(*scores.shape[:3], n + 1, dtype=torch.bool)  # column n: the slots past lengths
            masks.scatter_(-1, torch.where(keep, idx.long(), n), True)
            cap.mode, cap.masks = "draft", masks[..., :n]  # [L, C, Hkv, n]
            with torch.no_grad():
                logits = model(inp[None], position_ids=pid[None], past_key_values=cache, use_cache=True).logits[0]
            cache.crop(-inp.shape[0])  # drop the copies: the next method starts from the target KV
            if tok_eos is not None:
                logits[:, tok_eos] = -math.inf
            draft = logits.argmax(-1)
            ok = (draft.view(len(starts), k) == target).int()
            result[m] = ok.cumprod(dim=1).sum(dim=1).tolist()  # leading matches per cycle
            cap.mode = "score"
    finally:
        model.set_attn_implementation(old)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=list(EMBEDDED))
    ap.add_argument("--prompts", type=Path, default=Path("../shared/data/prompts/gsm8k_test.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.05)
    ap.add_argument("--min-budget", type=int, default=32)
    ap.add_argument("--recent", type=int, default=4)
    ap.add_argument("--hybrid-split", default="request", help="request / layer, or a window share in [0, 1]")
    ap.add_argument("--drafts", nargs="+", default=["pillar", "streaming", "hybrid"],
                    help="pillar / streaming / hybrid / share,share=X, each with optional ,split=..,reach=..")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="JSON of per-cycle acceptance per prompt and method")
    ap.add_argument("--paths-cache", type=Path, default=None,
                    help="JSON file keeping the generated target paths across runs (regenerated if the key differs)")
    ap.add_argument("--smoke", action="store_true", help="1 prompt, 40 tokens, budget 8, recent 2")
    args = ap.parse_args()
    if args.smoke:
        args.num_prompts, args.max_tokens, args.min_budget, args.recent = 1, 40, 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.hybrid_split not in ("request", "layer"):
        args.hybrid_split = float(args.hybrid_split)
    torch.manual_seed(0)
    model, tok = load_embedded(args.model, dtype=torch.float32, device="cpu")
    prompts = load_prompts(args.prompts, args.num_prompts, tok)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else eos
    t0, per = time.perf_counter(), []
    paths = target_paths(model, prompts, args.max_tokens, args.paths_cache)
    print(f"target paths: {time.perf_counter() - t0:.0f} s", flush=True)
    for i, ids in enumerate(prompts):
        per.append(replay_prompt(model, ids, paths[i], args, args.drafts, eos))
        print(f"prompt {i}: " + " ".join(f"{m} {sum(per[-1][m]) / max(1, len(per[-1][m])):.2f}" for m in args.drafts)
              + f" (cycles {per[-1]['cycles']}, full-forward flips {per[-1]['flips']}, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    k = args.stride
    print(f"\n{args.model} fp32 CPU, {len(prompts)} prompts x {args.max_tokens} tokens, k {k}, B = max({args.min_budget}, "
          f"{args.sparsity} L), recent {args.recent}, split {args.hybrid_split}\n")
    print("| draft | mean accepted of k | per position 1..k | cycles |\n|---|---|---|---|")
    summary = {}
    for m in args.drafts:
        acc = torch.tensor([a for p in per for a in p[m]])
        pos = [(acc > j).float().mean().item() for j in range(k)]
        summary[m] = {"mean_accepted": acc.float().mean().item(), "per_position": pos, "cycles": acc.numel()}
        print(f"| {m} | {summary[m]['mean_accepted']:.2f} | {' '.join(f'{p:.2f}' for p in pos)} | {acc.numel()} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {a: str(b) for a, b in vars(args).items()}, "summary": summary,
                                        "per_prompt": per}, indent=1))


if __name__ == "__main__":
    main()
