#!/usr/bin/env python3
"""GPU benchmark of the sparsespec kernels: bf16 correctness against the references first, then timings.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/kernels.py --out $OUT

Each timing is the median of CUDA-graph replays (triton.testing.do_bench_cudagraph), so launch gaps are out of
the numbers, as they would be under the runtime's CUDA graphs. "floor" = bytes that must move (each K/V row the
kernel has to read, once) / the device-to-device copy bandwidth measured in the same run (read + write bytes).
SDPA = torch.nn.functional.scaled_dot_product_attention on contiguous [B, Hkv, L, D] copies of the same K/V.
``--smoke`` runs everything tiny on the CPU interpreter (checks the script itself, no meaningful times).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="bench_out")
ap.add_argument("--smoke", action="store_true")
ap.add_argument("--budget-s", type=float, default=120, help="seconds after which a model's sections are skipped")
ap.add_argument("--sections", default="check,step,decode,draft,verify,score,mixed")
ap.add_argument("--models", default=None, help="comma-separated subset of the model shapes (default: all)")
ap.add_argument("--step-shapes", default=None,
                help="the step section's (B, L) per model, in order, e.g. 'smollm2=256x4096,64x8192;qwen3-8b=32x16384'")
# Parse the command line only when run as a script: transformers probes for a package named `kernels`, and a
# script started from bench/ puts this file first on sys.path under that name.
args = ap.parse_args() if __name__ == "__main__" else ap.parse_args([])
if args.smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402



def _import_kernels():
    """The kernels import only torch and triton; load them even where the rest of the package cannot import
    (PYTHONPATH=. does not apply pyproject's passes/ and runtime/ mapping)."""
    if os.environ.get("BENCH_STUB_PACKAGE") != "1":
        try:
            from sparsespec_compile import kernels
            return kernels
        except ImportError as e:
            print("package import failed (", e, "): loading sparsespec_compile.kernels alone", flush=True)
    import types

    for name in [m for m in sys.modules if m.startswith("sparsespec_compile")]:
        del sys.modules[name]
    pkg = types.ModuleType("sparsespec_compile")
    pkg.__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sparsespec_compile")]
    sys.modules["sparsespec_compile"] = pkg
    import sparsespec_compile.kernels as kernels

    return kernels


K = _import_kernels()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/kernel_step.py
from kernel_step import load_old_kernels  # noqa: E402

OLD = load_old_kernels(K)  # main's kernels for the step comparison ($OLD_KERNELS_DIR), or None
from sparsespec_compile.kernels.attention_triton import _attn_kernel_tuned as _attn_tuned  # noqa: E402
from sparsespec_compile.kernels.attention_triton import unified_attention_triton  # noqa: E402
from sparsespec_compile.kernels.pillars_triton import pillar_scores_triton  # noqa: E402

DEV = "cpu" if args.smoke else "cuda"
DT = torch.float32 if args.smoke else torch.bfloat16  # the interpreter's bf16 math is wrong
MODELS = {"qwen3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}  # (Hq, Hkv, D)
PAGE = 16
MAX_TOKENS = 2048 if args.smoke else 2 * 1024 * 1024  # KV pool: 8 GB for the Qwen shape
BS = [1, 2] if args.smoke else [1, 8, 32, 64, 128]
LS = [64, 160] if args.smoke else [4096, 8192, 16384, 32768]
SUB_BS = (2,) if args.smoke else (8, 32, 64)  # batches of the draft / verify / scoring sweeps
MIXED = (2, 160, 1) if args.smoke else (64, 16384, 8)  # (B, L, verify rows) of the fused-vs-two-launches case
os.makedirs(args.out, exist_ok=True)
RESULTS: dict = {"rows": [], "checks": []}


def log(*a):
    print(*a, flush=True)


def save():
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def bench_ms(fn) -> float:
    fn()  # compile + autotune outside the timed region
    if args.smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")
    except Exception as e:  # noqa: BLE001 - fall back to plain events, and say so in the JSON
        log("  (cudagraph timing failed, plain do_bench:", type(e).__name__, str(e)[:80], ")")
        RESULTS.setdefault("timing_fallbacks", []).append(f"{type(e).__name__}: {str(e)[:200]}")
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


class Pool:
    """One paged K/V pool per model shape, random bf16 (never zeros), shared by every case."""

    def __init__(self, name):
        self.name = name
        self.hq, self.hkv, self.d = MODELS[name]
        self.pages = MAX_TOKENS // PAGE + 8
        g = torch.Generator(device=DEV).manual_seed(0)
        self.k = torch.randn(self.pages, PAGE, self.hkv, self.d, device=DEV, dtype=DT, generator=g)
        self.v = torch.randn(self.pages, PAGE, self.hkv, self.d, device=DEV, dtype=DT, generator=g)
        self.scale = 1.0 / math.sqrt(self.d)

    def batch(self, B, L, q_len=1, seed=1):
        """B requests of context L with q_len new tokens each; shuffled pages."""
        npg = math.ceil(L / PAGE)
        g = torch.Generator(device=DEV).manual_seed(seed)
        bt = torch.randperm(self.pages, device=DEV, generator=g)[: B * npg].view(B, npg).to(torch.int32)
        q = torch.randn(B * q_len, self.hq, self.d, device=DEV, dtype=DT, generator=g)
        qsl = torch.arange(0, B * q_len + 1, q_len, device=DEV, dtype=torch.int32)
        lens = torch.full((B,), L, device=DEV, dtype=torch.int32)
        return dict(q=q, query_start_loc=qsl, seq_lens=lens, block_tables=bt, max_query_len=q_len, max_seq_len=L)

    def pillars(self, B, L, budget, tail, seed=2):
        """Sparse metadata: `budget` random sorted pillars below draft_start = L - tail, per (request, KV head)."""
        ds = L - tail
        g = torch.Generator(device=DEV).manual_seed(seed)
        idx = torch.rand(B, self.hkv, ds, device=DEV, generator=g).argsort(-1)[..., :budget].sort(-1).values
        return dict(is_sparse=torch.ones(B, dtype=torch.bool, device=DEV),
                    draft_start=torch.full((B,), ds, dtype=torch.int32, device=DEV),
                    pillar_indices=idx.to(torch.int32).contiguous(),
                    pillar_lengths=torch.full((B,), budget, dtype=torch.int32, device=DEV))

    def attend(self, b, impl="triton", **kw):
        kw = {**{k: v for k, v in b.items() if k != "q"}, **kw}
        return K.unified_attention(b["q"], self.k, self.v, scale=self.scale, impl=impl, **kw)

    def kv_bytes(self, n_rows):
        """Bytes of n_rows K/V rows of all KV heads (K and V)."""
        return n_rows * self.hkv * self.d * 2 * self.k.element_size()


def budget_for(L, s=0.05, min_budget=128):
    return max(min_budget, math.ceil(s * L))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written; median over 300 ms after 300 ms of warm-up (clocks ramp)."""
    n = (1 << 20) if args.smoke else (1 << 30)  # 2 GiB of bf16 each way
    x = torch.randn(n, device=DEV, dtype=DT)
    y = torch.empty_like(x)
    if args.smoke:
        ms = bench_ms(lambda: y.copy_(x))
    else:
        ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=300, rep=300, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def best_config():
    c = getattr(_attn_tuned, "best_config", None)
    return "" if c is None else f"N{c.kwargs.get('BLOCK_N')}w{c.num_warps}s{c.num_stages}"


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check(pool: Pool):
    """bf16: Triton vs the reference on a mixed batch (prefill chunk, decodes, verify, sparse drafts)."""
    B, L = (4, 100) if args.smoke else (6, 3000)
    specs = [(37, 37), (1, L), (9, L + 17), (1, L // 3), (1, L - 5), (9, 9 + L // 2)][:B]
    hq, hkv, d = pool.hq, pool.hkv, pool.d
    qlens = [n for n, _ in specs]
    qsl = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    npg = [math.ceil(s / PAGE) for _, s in specs]
    perm = torch.randperm(pool.pages, device=DEV)
    bt = torch.zeros(len(specs), max(npg), dtype=torch.int32, device=DEV)
    o = 0
    for r, n in enumerate(npg):
        bt[r, :n] = perm[o:o + n]
        o += n
    q = torch.randn(1, hq, sum(qlens) + 3, d, device=DEV, dtype=DT).transpose(1, 2)[0]  # strided, 3 padding
    lens = torch.tensor([s for _, s in specs], dtype=torch.int32, device=DEV)
    sparse = {"is_sparse": torch.tensor([False, True, False, True, True, False][:B], device=DEV),
              "draft_start": (lens - torch.tensor(qlens, device=DEV) - 3).clamp(min=0).int()}
    bud = 64
    sparse["pillar_indices"] = torch.stack([torch.rand(hkv, max(int(ds), 1), device=DEV).argsort(-1)[:, :bud].sort(-1).values
                                            if int(ds) >= bud else torch.zeros(hkv, bud, device=DEV, dtype=torch.long)
                                            for ds in sparse["draft_start"].tolist()]).int()
    sparse["pillar_lengths"] = torch.where(sparse["draft_start"] >= bud, bud, 0).int()
    meta = dict(query_start_loc=qsl, seq_lens=lens, block_tables=bt, max_query_len=max(qlens),
                max_seq_len=max(s for _, s in specs), scale=pool.scale, return_lse=True, softcap=0.0)
    for label, extra in (("full", {}), ("mixed sparse", sparse), ("softcap+window", dict(softcap=30.0, sliding_window=700))):
        kw = {**meta, **extra}
        kt = {k: v for k, v in kw.items() if k != "return_lse"}
        o_r, l_r = K.unified_attention(q, pool.k, pool.v, impl="reference", **kw)
        # the step's own plan, and one forced to cut every row into 128-key items (every unit merged)
        for how, force in (("plan", {}), ("cut 128", dict(chunk_keys=128))):
            o_t, l_t = unified_attention_triton(q, pool.k, pool.v, block_n=64, **kt, **force)  # fixed config
            e = rel(o_t, o_r)
            le = float((l_t - l_r).nan_to_num(neginf=0).abs().max())
            pad_ok = bool((o_t[-3:] == 0).all() and torch.isneginf(l_t[-3:]).all())
            ok = e < 1e-2 and le < 1e-2 and bool(torch.isfinite(o_t).all()) and pad_ok
            RESULTS["checks"].append(dict(model=pool.name, what=f"attention {label} ({how})", rel_err=e,
                                          lse_max_abs=le, padding_ok=pad_ok, ok=ok))
            log(f"  check {pool.name} attention {label} ({how}): rel err {e:.2e}, lse max abs {le:.2e}, padding "
                f"{pad_ok} -> {'OK' if ok else 'FAIL'}")
    _, lse = K.unified_attention(q, pool.k, pool.v, impl="reference", **meta)
    rows = torch.tensor([2, 5][: max(1, B - 4)], device=DEV)
    skw = dict(query_start_loc=qsl, seq_lens=lens, block_tables=bt, rows=rows, lse=lse, scale=pool.scale,
               max_ctx=int(meta["max_seq_len"]))
    s_r = K.pillar_scores(q, pool.k, impl="reference", **skw)
    e = 0.0
    for mq in (None, 9):  # q-blocks looped over, and one block for the 9-token verify rows (what the runtime passes)
        s_t = pillar_scores_triton(q, pool.k, **skw, block_n=128, max_query_len=mq)
        e = max(e, rel(s_t.nan_to_num(neginf=0), s_r.nan_to_num(neginf=0)))
    ctx = (lens - torch.tensor(qlens, device=DEV))[rows]
    budget = torch.full_like(ctx, 300)
    from sparsespec_compile.kernels.select_triton import select_pillars_triton

    i_r, n_r = K.select_pillars(s_r, ctx, budget, 16, 512, impl="reference")
    same = True
    for method in ("resident", "radix"):
        i_t, n_t = select_pillars_triton(s_r, ctx, budget, 16, 512, method=method)
        same = same and bool(torch.equal(i_t, i_r) and torch.equal(n_t, n_r))
    kc, vc = pool.k[:64].clone(), pool.v[:64].clone()
    kr, vr = kc.clone(), vc.clone()
    kn = torch.randn(1, hkv, 40, d, device=DEV, dtype=DT).transpose(1, 2)[0]
    slots = torch.randperm(64 * PAGE, device=DEV)[:40]
    slots[::7] = -1
    K.write_kv(kc, vc, kn, kn, slots, impl="triton")
    K.write_kv(kr, vr, kn, kn, slots, impl="reference")
    wk = bool(torch.equal(kc, kr) and torch.equal(vc, vr))
    ok = e < 1e-2 and same and wk
    RESULTS["checks"].append(dict(model=pool.name, what="scores/select/write_kv", scores_rel_err=e, select_exact=same,
                                  write_kv_exact=wk, ok=ok))
    log(f"  check {pool.name} scores rel err {e:.2e}, select exact {same}, write_kv exact {wk} -> {'OK' if ok else 'FAIL'}")


def sdpa_ms(pool, b, B, L):
    """torch SDPA over contiguous K/V holding the same data as the pages."""
    bt = b["block_tables"].long()
    kc = pool.k[bt].reshape(B, -1, pool.hkv, pool.d)[:, :L].transpose(1, 2).contiguous()
    vc = pool.v[bt].reshape(B, -1, pool.hkv, pool.d)[:, :L].transpose(1, 2).contiguous()
    q = b["q"].view(B, -1, pool.hq, pool.d).transpose(1, 2)
    f = torch.nn.functional.scaled_dot_product_attention
    try:
        ms = bench_ms(lambda: f(q, kc, vc, scale=pool.scale, enable_gqa=True))
    except Exception as e:  # noqa: BLE001
        log("  sdpa failed:", str(e)[:100])
        ms = float("nan")
    del kc, vc
    return ms


def row(**r):
    RESULTS["rows"].append(r)
    log("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    save()


def main():
    RESULTS["env"] = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(), torch=torch.__version__,
                          triton=triton.__version__, device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                          argv=sys.argv)
    log(RESULTS["env"])
    bw = copy_bandwidth()
    RESULTS["copy_bw_TBps"] = bw / 1e12
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    sections = args.sections.split(",")
    full_ms = {}
    t0 = time.time()
    for name in (args.models.split(",") if args.models else MODELS):
        try:
            run_model(name, sections, bw, full_ms, t0)
        except Exception as e:  # noqa: BLE001 - keep what was measured, report the failure
            import traceback

            traceback.print_exc()
            RESULTS.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
        if DEV == "cuda":
            torch.cuda.empty_cache()
    finish()


STEP_SHAPES = {"smollm2": [(2, 160)] if args.smoke else [(64, 2048), (64, 8192), (256, 4096), (256, 16384)],
               "qwen3-8b": [(2, 160)] if args.smoke else [(32, 8192), (32, 16384), (32, 32768)]}
if args.step_shapes:
    for part in args.step_shapes.split(";"):
        model, shapes = part.split("=")
        STEP_SHAPES[model.strip()] = [tuple(int(x) for x in bl.split("x")) for bl in shapes.split(",")]
STEP_LAYERS = 2 if args.smoke else 4
FULL_CASES = {"smollm2": [("decode", 2, 160), ("prefill", 1, 64)] if args.smoke else
              [("decode", 64, 4096), ("decode", 256, 4096), ("prefill", 4, 2048)],
              "qwen3-8b": [("decode", 2, 160)] if args.smoke else
              [("decode", 32, 8192), ("decode", 32, 32768), ("prefill", 2, 4096)]}


def run_model(name, sections, bw, full_ms, t0):
    pool = Pool(name)
    if time.time() - t0 > args.budget_s:
        log("time budget spent: skipping", name)
        return
    if "check" in sections:
        check(pool)
    if "step" in sections:
        from kernel_step import bench_full_compare, bench_steps

        bench_steps(pool, K, bench_ms, bw, row, log, STEP_SHAPES[name], STEP_LAYERS, old=OLD)
        bench_full_compare(pool, K, bench_ms, bw, row, OLD, FULL_CASES[name])
    if name != "qwen3-8b":  # the second shape: decode/draft/verify only, to keep the run under a few minutes
        sections = [x for x in sections if x in ("check", "decode", "draft", "verify")]
    if "decode" in sections:
        for B in BS:
            for L in LS:
                if B * L > MAX_TOKENS or time.time() - t0 > args.budget_s + 50:
                    continue
                b = pool.batch(B, L)
                ms = bench_ms(lambda: pool.attend(b))
                full_ms[name, B, L] = ms
                floor = pool.kv_bytes(B * L) / bw * 1e3
                sd = sdpa_ms(pool, b, B, L)
                row(kind="decode", model=name, B=B, L=L, ms=ms, floor_frac=floor / ms, sdpa_ms=sd, vs_sdpa=sd / ms,
                    cfg=best_config())
    if "draft" in sections and time.time() - t0 < args.budget_s + 50:
        for B in SUB_BS:
            for L in LS[-2:]:
                if B * L > MAX_TOKENS or (name, B, L) not in full_ms:
                    continue
                bud = min(budget_for(L), L - 5)
                b = pool.batch(B, L)
                sp = pool.pillars(B, L, bud, tail=5)
                ms = bench_ms(lambda: pool.attend(b, **sp))
                floor = pool.kv_bytes(B * (bud + 5)) / bw * 1e3
                row(kind="draft s=5%", model=name, B=B, L=L, ms=ms, floor_frac=floor / ms,
                    speedup_vs_full=full_ms[name, B, L] / ms, cfg=best_config())
    if "verify" in sections and time.time() - t0 < args.budget_s + 50:
        for B in SUB_BS:
            for L in LS[1::2]:
                if (name, B, L) not in full_ms:
                    continue
                b = pool.batch(B, L, q_len=9)
                ms = bench_ms(lambda: pool.attend(b, return_lse=True))
                row(kind="verify 9q", model=name, B=B, L=L, ms=ms, vs_decode=ms / full_ms[name, B, L],
                    floor_frac=pool.kv_bytes(B * L) / bw * 1e3 / ms, cfg=best_config())
    if "score" in sections and time.time() - t0 < args.budget_s + 50:
        for B in SUB_BS[1:] or SUB_BS:
            for L in LS[1::2]:
                if (name, B, L) not in full_ms:
                    continue
                for rv in (B, max(1, B // 9)):  # every request verifying / the steady-state share (1 in k+1)
                    b = pool.batch(rv, L, q_len=9)
                    _, lse = pool.attend(b, return_lse=True)
                    rows = torch.arange(rv, device=DEV)
                    skw = {k: b[k] for k in ("query_start_loc", "seq_lens", "block_tables")}
                    sc = lambda: K.pillar_scores(b["q"], pool.k, **skw, rows=rows, lse=lse,  # noqa: E731
                                                 scale=pool.scale, max_ctx=L, max_query_len=9)
                    s_ms = bench_ms(sc)
                    scores = sc()
                    ctx = torch.full((rv,), L - 9, device=DEV, dtype=torch.int32)
                    bud = budget_for(L - 9)
                    budget = torch.full_like(ctx, bud)
                    sel_ms = bench_ms(lambda: K.select_pillars(scores, ctx, budget, 16, bud))
                    sel_t_ms = bench_ms(lambda: K.select_pillars(scores, ctx, budget, 16, bud, impl="reference"))
                    d = full_ms[name, B, L]
                    row(kind="score+select", model=name, B=B, Rv=rv, L=L, score_ms=s_ms, select_ms=sel_ms,
                        torch_select_ms=sel_t_ms, frac_of_decode=(s_ms + sel_ms) / d)
    if "mixed" in sections and time.time() - t0 < args.budget_s + 50 and (name, MIXED[0], MIXED[1]) in full_ms:
        B, L, nv = MIXED  # e.g. 56 sparse drafts + 8 verify chunks: one launch vs two
        bd = pool.batch(B - nv, L, seed=3)
        spd = pool.pillars(B - nv, L, min(budget_for(L), L - 5), tail=5)
        bv = pool.batch(nv, L, q_len=9, seed=4)
        t_d = bench_ms(lambda: pool.attend(bd, **spd))
        t_v = bench_ms(lambda: pool.attend(bv))
        qsl = torch.cat([bd["query_start_loc"], bv["query_start_loc"][1:] + bd["query_start_loc"][-1]])
        cat = lambda a, c: torch.cat([a, c])  # noqa: E731
        mb = dict(q=cat(bd["q"], bv["q"]), query_start_loc=qsl, seq_lens=cat(bd["seq_lens"], bv["seq_lens"]),
                  block_tables=cat(bd["block_tables"], bv["block_tables"]), max_query_len=9, max_seq_len=L)
        msp = dict(is_sparse=cat(spd["is_sparse"], torch.zeros(nv, dtype=torch.bool, device=DEV)),
                   draft_start=cat(spd["draft_start"], bv["seq_lens"] * 0),
                   pillar_indices=cat(spd["pillar_indices"],
                                      torch.zeros(nv, pool.hkv, spd["pillar_indices"].shape[-1], dtype=torch.int32,
                                                  device=DEV)),
                   pillar_lengths=cat(spd["pillar_lengths"], bv["seq_lens"] * 0))
        t_m = bench_ms(lambda: pool.attend(mb, **msp))
        row(kind=f"mixed {B - nv} draft + {nv} verify", model=name, B=B, L=L, fused_ms=t_m, two_launches_ms=t_d + t_v,
            fused_gain=(t_d + t_v) / t_m)
    del pool


def finish():
    RESULTS["copy_bw_TBps_end"] = copy_bandwidth() / 1e12
    log(f"copy bandwidth at the end {RESULTS['copy_bw_TBps_end']:.2f} TB/s (floor fractions use the start value)")
    save()
    ok = all(c["ok"] for c in RESULTS["checks"])
    log("\nSUMMARY checks", "OK" if ok else "FAIL")
    for r in RESULTS["rows"]:
        log(" ", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()
