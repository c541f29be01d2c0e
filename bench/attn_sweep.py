#!/usr/bin/env python3
"""Sweep of the unified attention kernel's launch plan (BLOCK_N, warps, stages, keys per plan item) at the shapes the
end-to-end runs produce, against the bytes floor and torch SDPA on contiguous K/V.

    python3 bench/attn_sweep.py --out $OUT       (next to bench/kernels.py: it reuses its Pool)

Why: the per-kernel profile of a SmolLM2-shaped stride-0 step (B 64, context ~2.2k, H200) put the attention at
1.32 of the step's 2.73 ms, at 0.58 of its floor, with the two tuned configs and the 2-programs-per-SM split plan.
Cases: SmolLM2 (9/3/64) decode at B 64 x L 2k/4k/8k; a mixed step of 57 sparse drafts (budget 128) + 7 verify
chunks (9 queries) at L 2k/4k; Qwen3-8B (32/8/128) decode at B 32 x L 4k to check a plan does not regress there.
Writes attn_sweep.json: every (case, config, chunk) time, the best per case, and the current plan's time. (The
figures in bench/RESULTS.md from before the work plan swept a launch-wide split count instead of the chunk.)
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402  (bench/kernels.py: Pool, bench_ms, copy_bandwidth)
import torch  # noqa: E402

from sparsespec_compile.kernels.attention_triton import unified_attention_triton  # noqa: E402

CONFIGS = [(bn, w, s) for bn, w, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 4)) if not (bn == 32 and w == 8)]
CHUNKS = (None, 256, 512, 1024, 2048, 4096)  # keys per item of the plan (None: the plan's own choice)


def cases():
    smol = kb.Pool("smollm2")
    for L in (2048, 4096, 8192):
        yield "smollm2", f"decode B64 L{L}", smol, smol.batch(64, L), {}, smol.kv_bytes(64 * L)
    for L in (2048, 4096):
        bd = smol.batch(57, L, seed=3)
        spd = smol.pillars(57, L, 128, tail=5)
        bv = smol.batch(7, L, q_len=9, seed=4)
        cat = torch.cat
        mb = dict(q=cat([bd["q"], bv["q"]]),
                  query_start_loc=cat([bd["query_start_loc"], bv["query_start_loc"][1:] + bd["query_start_loc"][-1]]),
                  seq_lens=cat([bd["seq_lens"], bv["seq_lens"]]), block_tables=cat([bd["block_tables"], bv["block_tables"]]),
                  max_query_len=9, max_seq_len=L)
        msp = dict(is_sparse=cat([spd["is_sparse"], torch.zeros(7, dtype=torch.bool, device="cuda")]),
                   draft_start=cat([spd["draft_start"], bv["seq_lens"] * 0]),
                   pillar_indices=cat([spd["pillar_indices"], torch.zeros(7, 3, 128, dtype=torch.int32, device="cuda")]),
                   pillar_lengths=cat([spd["pillar_lengths"], bv["seq_lens"] * 0]))
        yield "smollm2", f"mixed 57 draft + 7 verify L{L}", smol, mb, msp, smol.kv_bytes(57 * 133 + 7 * L)
    del smol
    torch.cuda.empty_cache()
    qw = kb.Pool("qwen3-8b")
    yield "qwen3-8b", "decode B32 L4096", qw, qw.batch(32, 4096), {}, qw.kv_bytes(32 * 4096)


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    bw = kb.copy_bandwidth()
    res = {"copy_bw_TBps": bw / 1e12, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cases": []}
    t0 = time.time()
    for model, name, pool, b, sp, nbytes in cases():
        floor_ms = nbytes / bw * 1e3
        meta = {k: v for k, v in b.items() if k != "q"}
        cur = kb.bench_ms(lambda: pool.attend(b, **sp))
        rec = {"model": model, "case": name, "floor_ms": floor_ms, "current_ms": cur, "current_floor_frac": floor_ms / cur,
               "current_cfg": kb.best_config(), "runs": []}
        if model == "smollm2" and "decode" in name:
            f = torch.nn.functional.scaled_dot_product_attention
            bt = b["block_tables"].long()
            B, L = bt.shape[0], b["max_seq_len"]
            kc = pool.k[bt].reshape(B, -1, pool.hkv, pool.d)[:, :L].transpose(1, 2).contiguous()
            vc = pool.v[bt].reshape(B, -1, pool.hkv, pool.d)[:, :L].transpose(1, 2).contiguous()
            q = b["q"].view(B, 1, pool.hq, pool.d).transpose(1, 2)
            rec["sdpa_ms"] = kb.bench_ms(lambda: f(q, kc, vc, scale=pool.scale, enable_gqa=True))
            del kc, vc
        for (bn, w, s), n in itertools.product(CONFIGS, CHUNKS):
            if time.time() - t0 > 400:
                rec["truncated"] = True
                break
            try:
                ms = kb.bench_ms(lambda: unified_attention_triton(b["q"], pool.k, pool.v, scale=pool.scale, **meta, **sp,
                                                                  chunk_keys=n, block_n=bn, num_warps=w, num_stages=s))
            except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory) is skipped
                rec["runs"].append({"cfg": [bn, w, s], "chunk_keys": n, "error": str(e)[:80]})
                continue
            rec["runs"].append({"cfg": [bn, w, s], "chunk_keys": n, "ms": ms, "floor_frac": floor_ms / ms})
        ok = [r for r in rec["runs"] if "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            rec["best"] = best
            print(f"{model} {name}: floor {floor_ms:.4f} ms, current {cur:.4f} ({floor_ms / cur:.2f}, {rec['current_cfg']}), "
                  f"best {best['ms']:.4f} ({best['floor_frac']:.2f}) cfg {best['cfg']} chunk {best['chunk_keys']}"
                  + (f", sdpa {rec['sdpa_ms']:.4f}" if "sdpa_ms" in rec else ""), flush=True)
            top = sorted(ok, key=lambda r: r["ms"])[:6]
            print("   top:", [(r["cfg"], r["chunk_keys"], round(r["ms"], 4)) for r in top], flush=True)
        res["cases"].append(rec)
        with open(os.path.join(out, "attn_sweep.json"), "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
