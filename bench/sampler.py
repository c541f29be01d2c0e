#!/usr/bin/env python3
"""Micro-benchmark of the sampler alone (issue 18): time per call against the bytes of the logits.

    PYTHONUNBUFFERED=1 python3 bench/sampler.py --out $OUT          # H200: ~3 min
    python3 bench/sampler.py --smoke --out /tmp/s                   # CPU interpreter, tiny sizes (checks the script)

For B rows x V (49,152: SmolLM2; 151,936: Qwen3) bf16 logits it times, per configuration (temperature only, top-p
0.95, top-k 50, top-k 50 + top-p 0.95, top-k 1000 + top-p 0.95; all at T 0.6):
  * ``new``: kernels/sampling_triton.sample_rows (the split search: first sweep, 4 count-radix sweeps, the gather
    sweep, candidates cut in registers; rows whose nucleus exceeds the candidates add 8 mass-radix sweeps and a race
    sweep), the noise seeds drawn on the device in the same graph (as a step does);
  * ``old``: the sampler before issue 18 (runtime/verify.py at 715fc9e, copied below): a full-vocabulary sort for
    top-p (torch.topk when every row has a top-k), two softmaxes, a scatter, an exponential race over [B, V];
  * ``argmax``: greedy decoding's cost, the same bytes read once.
Each time is the median of CUDA-graph replays (triton.testing.do_bench_cudagraph). ``floor_us`` = the logits' bytes
/ 4.2 TB/s (H200 HBM, read once); ``x_floor`` = time / floor; ``paths``: how many rows took each path of the search
(kernels/sampling_triton.MODE_NAMES). Two kinds of logits: ``zipf`` (a few likely tokens and a long tail, like a
language model's: the nucleus of top-p 0.95 at T 0.6 is tens to hundreds of tokens) and ``randn`` (N(0, 1): a nearly
flat row whose nucleus is most of the vocabulary: the mass search's case).

A ``check`` section first compares the kernel's tokens and kept-set statistics with the torch reference on bf16
logits on the device (the same noise: the tokens must be equal), at both vocabularies, with the default shapes and
with a small candidate bound that sends most rows through the mass search; a ``verify`` section times one
speculative verification (N requests x k + 1 = 9 target rows, the residual) new vs old. ``tune`` times the shapes
the launcher accepts (tokens per sweep program x candidate bound / slots) at B 256; the launcher refuses any shape
that could index outside its buffers (sampling_triton._check_shape), so every tune config is in bounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="bench_out")
ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny sizes: checks the script, no real times")
ap.add_argument("--batch", type=int, nargs="*", default=[1, 64, 256, 512])
ap.add_argument("--vocab", type=int, nargs="*", default=[49_152, 151_936])
ap.add_argument("--hbm-tbps", type=float, default=4.2)
ap.add_argument("--sections", default="check,sampler,tune,verify")
args = ap.parse_args()
if args.smoke:
    os.environ["TRITON_INTERPRET"] = "1"
    args.batch, args.vocab = [2], [300]

import torch  # noqa: E402
import triton  # noqa: E402

from sparsespec_compile.kernels import sampling_reference as ref  # noqa: E402
from sparsespec_compile.kernels.sampling_triton import sample_rows  # noqa: E402

DEV = "cpu" if args.smoke else "cuda"
T = 0.6
CONFIGS = {"temperature": (0, 1.0), "top_p_0.95": (0, 0.95), "top_k_50": (50, 1.0), "top_k_50_top_p_0.95": (50, 0.95),
           "top_k_1000_top_p_0.95": (1000, 0.95)}


def logits_of(kind: str, b: int, v: int) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(0)
    if kind == "randn":
        return torch.randn(b, v, generator=g, device=DEV).to(torch.bfloat16)
    # zipf: token of rank r gets logit -log(r) (at T 0.6: p ~ r^-1.67, top-p 0.95 keeps ~50 tokens), jittered, in
    # a random order per row
    rank = torch.rand(b, v, generator=g, device=DEV).argsort(-1).float() + 1
    return (-rank.log() + 0.05 * torch.randn(b, v, generator=g, device=DEV)).to(torch.bfloat16)


def old_filtered(logits: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The old sampler's transform (runtime/verify.py at 715fc9e): logits / T with the tokens outside top-k / top-p
    at -inf, by a full sort (or top-k) of every row."""
    x = logits.float() / temperature.view(-1, 1)
    top_k = min(top_k, x.shape[-1])
    if top_k or top_p < 1:
        sx, si = x.topk(top_k, -1) if top_k else x.sort(-1, descending=True)
        if top_k:
            sx = sx.masked_fill(sx < sx[:, top_k - 1:top_k], float("-inf"))
        if top_p < 1:
            sp = sx.softmax(-1)
            sx = sx.masked_fill(sp.cumsum(-1) - sp >= top_p, float("-inf"))
        x = (torch.full_like(x, float("-inf")) if top_k else torch.empty_like(x)).scatter_(-1, si, sx)
    return x


def old_sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The pre-issue-18 sampler (probs_from_logits + _race of runtime/verify.py at 715fc9e), one config per batch."""
    x = old_filtered(logits, temperature, top_k, top_p)
    probs = x.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def timed(fn) -> float:
    """Median ms per call: CUDA-graph replays on the GPU (a failed capture is a finding: NaN, the error printed), a
    plain call on the CPU interpreter."""
    if not args.smoke:
        # do_bench_cudagraph runs fn on a fresh side stream with no wait on the default stream, where this script
        # made fn's inputs a moment before: unsynchronized, its first call read them unwritten (a stale row index
        # from the caching allocator: the H200's illegal memory access in the verify and tune sections, 2026-12-01,
        # 2 of 2 runs at V 151,936 without this sync, 0 of 2 with it; under compute-sanitizer launches serialize,
        # hence its 0 errors)
        torch.cuda.synchronize()
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=30)
        except Exception as e:  # noqa: BLE001
            print("  timing failed:", type(e).__name__, str(e)[:300], flush=True)
            return float("nan")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def rows_inputs(b: int, v: int, top_k: int, top_p: float):
    full = lambda x, dt: torch.full((b,), x, dtype=dt, device=DEV)  # noqa: E731
    return (torch.arange(b, device=DEV), full(1 / T, torch.float32), full(top_k or v, torch.int64),
            full(top_p, torch.float32), full(False, torch.bool))


def check(records: list) -> None:
    from sparsespec_compile.kernels.sampling_triton import MODE_NAMES

    b = 2 if args.smoke else 64
    shapes = {"default": {}, "small_cap": dict(cap=16, capb=32)}  # small_cap: most top-p rows take the mass search
    for v in args.vocab:
        for kind in ("zipf", "randn"):
            x = logits_of(kind, b, v)
            for shape, kw in shapes.items():
                for name, (k, p) in CONFIGS.items():
                    rows, it, tk, tp, gr = rows_inputs(b, v, k, p)
                    gr[::4] = True  # a mixed batch: every 4th row greedy
                    seeds = torch.randint(0, 1 << 62, (b,), device=DEV)
                    modes: list = []
                    tok, st = sample_rows(x, rows, it, tk, tp, gr, seeds, _modes=modes, **kw)
                    tok_r, st_r = ref.sample_rows_reference(x, it, tk, tp, gr, seeds)
                    kept = ((x.float() * it.view(-1, 1)) >= st[:, 1:2]).sum(-1).float()
                    paths = {MODE_NAMES[i]: int((modes[0] == i).sum()) for i in range(len(MODE_NAMES))}
                    rec = dict(section="check", logits=kind, V=v, B=b, config=name, shape=shape,
                               tokens_equal=float((tok == tok_r).float().mean()),
                               tau_equal=float((st[:, 1] == st_r[:, 1]).float().mean()),
                               z_max_rel_err=float(((st[:, 2] - st_r[:, 2]).abs() / st_r[:, 2]).max()),
                               p_max_rel_err=float(((st[:, 3] - st_r[:, 3]).abs() / st_r[:, 3]).max()),
                               kept_tokens_median=float(kept.median()), paths=paths)
                    records.append(rec)
                    print(f"check V {v} {kind:5s} {shape:9s} {name:22s} tokens equal {rec['tokens_equal']:.3f}  tau "
                          f"equal {rec['tau_equal']:.3f}  z rel err {rec['z_max_rel_err']:.1e}  kept "
                          f"{rec['kept_tokens_median']:.0f}  paths {paths}", flush=True)


def sampler(records: list) -> None:
    from sparsespec_compile.kernels.sampling_triton import MODE_NAMES

    for v in args.vocab:
        for kind in ("zipf",) if args.smoke else ("zipf", "randn"):
            for b in args.batch:
                x = logits_of(kind, b, v)
                floor = b * v * x.element_size() / (args.hbm_tbps * 1e12) * 1e6  # us
                ms = timed(lambda: x.argmax(-1))
                records.append(dict(section="sampler", logits=kind, V=v, B=b, config="greedy", impl="argmax", ms=ms,
                                    floor_us=floor, x_floor=ms * 1e3 / floor))
                line = [f"V {v:6d} {kind:5s} B {b:3d}  floor {floor:7.1f} us  argmax {ms * 1e3:7.1f}"]
                for name, (k, p) in CONFIGS.items():
                    rows, it, tk, tp, gr = rows_inputs(b, v, k, p)
                    modes: list = []
                    sample_rows(x, rows, it, tk, tp, gr, torch.zeros(b, dtype=torch.int64, device=DEV), _modes=modes)
                    paths = {MODE_NAMES[i]: int((modes[0] == i).sum()) for i in range(len(MODE_NAMES))}
                    new = timed(lambda: sample_rows(x, rows, it, tk, tp, gr,
                                                    torch.randint(0, 1 << 62, (b,), device=DEV)))
                    temp = torch.full((b,), T, device=DEV)
                    old = timed(lambda: old_sample(x, temp, k, p))
                    for impl, t in (("new", new), ("old", old)):
                        records.append(dict(section="sampler", logits=kind, V=v, B=b, config=name, impl=impl, ms=t,
                                            floor_us=floor, x_floor=t * 1e3 / floor,
                                            **(dict(paths=paths) if impl == "new" else {})))
                    line.append(f"{name} {new * 1e3:.1f} (old {old * 1e3:.1f})")
                print(" | ".join(line), flush=True)


from sparsespec_compile.kernels.sampling_triton import TUNE_SHAPES  # noqa: E402  (chunk, cap, capb): bounds-checked
# in the interpreter by tests/kernels/test_sampling_triton.py; the launcher checks each


def tune(records: list) -> None:
    """The split search's shapes at B 256 (the smallest batch on the CPU smoke run), for the filters that search. The
    defaults are kernels/sampling_triton.CHUNK / CAP / CAPB. Shapes are arguments of sample_rows, never module
    globals patched under a running graph; sampling_triton._check_shape refuses any that could index out of bounds."""
    b = args.batch[-1] if args.smoke else 256
    shapes = [(64, 8, 16)] if args.smoke else TUNE_SHAPES
    for v in args.vocab:
        for kind in ("zipf",) if args.smoke else ("zipf", "randn"):
            x = logits_of(kind, b, v)
            for name in ("top_p_0.95", "top_k_50", "top_k_50_top_p_0.95"):
                k, p = CONFIGS[name]
                rows, it, tk, tp, gr = rows_inputs(b, v, k, p)
                for chunk, cap, capb in shapes:
                    kw = dict(chunk=chunk, cap=cap, capb=capb)
                    t = timed(lambda: sample_rows(x, rows, it, tk, tp, gr, torch.randint(0, 1 << 62, (b,), device=DEV),
                                                  **kw))
                    records.append(dict(section="tune", logits=kind, V=v, B=b, config=name, **kw, ms=t))
                    print(f"tune V {v} {kind:5s} B {b} {name:20s} chunk {chunk:5d} cap {cap:4d} capb {capb:4d}: "
                          f"{t * 1e3:8.1f} us", flush=True)


def verify_section(records: list) -> None:
    try:
        from sparsespec_compile.runtime.sampling_params import SamplingParams
        from sparsespec_compile.runtime.verify import Drafts, rejection_sample, sample
    except ImportError as e:  # PYTHONPATH=. does not map runtime/ into the package: pip install -e . does
        print("verify section skipped: the package does not import (", e, ")", flush=True)
        return
    k = 8
    for v in args.vocab:
        for n in ([2] if args.smoke else [32, 64]):
            target = logits_of("zipf", n * (k + 1), v)  # [N*(k+1), V]: the rows of a step's verify chunks
            draft = (target.view(n, k + 1, v)[:, :k].float() + torch.randn(n, k, v, device=DEV)).to(torch.bfloat16)
            draft = draft.reshape(n * k, v)
            index = torch.arange(n * (k + 1), device=DEV).view(n, k + 1)
            for name, (topk, p) in CONFIGS.items():
                params = SamplingParams(temperature=T, top_k=topk, top_p=p)
                d, q = sample(draft, params)
                drafts = Drafts(draft, q, torch.arange(n * k, device=DEV).view(n, k))
                new = timed(lambda: rejection_sample(d.view(n, k), drafts, target, params, target_index=index))
                temp = torch.full((n * (k + 1),), T, device=DEV)
                old = timed(lambda: old_verify(d.view(n, k), draft, target, temp, topk, p, n, k))
                for impl, t in (("new", new), ("old", old)):
                    records.append(dict(section="verify", logits="zipf", V=v, N=n, k=k, config=name, impl=impl, ms=t))
                print(f"verify V {v} N {n} k {k} {name:22s} new {new * 1e3:8.1f} us  old {old * 1e3:8.1f} us",
                      flush=True)


def old_verify(d, draft, target, temp, top_k, top_p, n, k):
    """The old verification's device work: target probabilities [N, k+1, V] by the old sampler's transform, the draft
    probabilities it kept [N, k, V] (fp32), the accept test and the residual race."""
    x = old_filtered(target, temp, top_k, top_p)
    p = x.softmax(-1).view(n, k + 1, -1)
    q = draft.float().softmax(-1).view(n, k, -1)  # (the old path kept these from the drafts: read, not computed)
    dd = d.unsqueeze(-1)
    accept = torch.rand(n, k, device=d.device) * q.gather(-1, dd).squeeze(-1) < p[:, :k].gather(-1, dd).squeeze(-1)
    a = accept.long().cumprod(1).sum(1)
    rows = torch.arange(n, device=d.device)
    qa = torch.cat([q, q.new_zeros(n, 1, q.shape[-1])], 1)[rows, a]
    r = (p[rows, a] - qa).clamp_min(0)
    return (r / torch.empty_like(r).exponential_()).argmax(-1)


def main() -> None:
    records: list = []
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sampler_h200.json" if DEV == "cuda" else "sampler_smoke.json")

    def save() -> None:  # after every section: a run cut short by a time limit keeps what it measured
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke)",
                    torch=torch.__version__, triton=triton.__version__, temperature=T, hbm_tbps=args.hbm_tbps,
                    command=" ".join(sys.argv), seconds=round(time.time() - t0, 1))
        with open(path, "w") as f:
            json.dump(dict(meta=meta, records=records), f, indent=1)

    sections = dict(check=check, sampler=sampler, tune=tune, verify=verify_section)
    for name in args.sections.split(","):
        sections[name](records)
        save()
    print("wrote", path)


if __name__ == "__main__":
    main()
