#!/usr/bin/env python3
"""Registers, spills, shared memory and cp.async count of the step's kernels, compiled for sm_90 on a machine
without a GPU (Triton's bundled ptxas), for the branch's kernels and, with $OLD_KERNELS_DIR, main's.

    python bench/ptxas_check.py            # SmolLM2 (group 3, d 64) and Qwen3-8B (group 4, d 128) shapes

The JIT marks 16-divisible pointers and strides (tt.divisibility); so does this, or no load vectorises and the
pipeliner (cp.async) never applies. Occupancy and prefetching explain most of a memory-bound kernel's distance from
its bytes floor, so these numbers are the CPU-side evidence for a change before it meets the H200.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
FP32 = {"lse", "part_acc", "part_m", "part_l", "scores"}
BF16 = {"out", "q", "k_cache", "v_cache"}
I64 = {"rows"}


def compile_sm90(jitfn, consts: dict, num_warps: int, num_stages: int) -> dict:
    names = list(inspect.signature(jitfn.fn).parameters)
    ptrs = {n for n in names if n not in consts and n not in ("scale", "softcap")
            and (n in FP32 | BF16 | I64 or not re.match(r"^(stride_|max_|n_|R$|N$|num_|recent$|sliding|seq_b|work_b)", n))}
    sig = {}
    for n in names:
        sig[n] = ("constexpr" if n in consts else "fp32" if n in ("scale", "softcap") else
                  ("*fp32" if n in FP32 else "*bf16" if n in BF16 else "*i64" if n in I64 else "*i32") if n in ptrs
                  else "i32")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n in ptrs or (n.startswith("stride") and n != "stride_sj")}
    k = triton.compile(ASTSource(fn=jitfn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    err = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    os.unlink(f.name)
    regs, spills = re.search(r"Used (\d+) registers", err), re.search(r"(\d+) bytes spill stores", err)
    return dict(regs=int(regs.group(1)) if regs else None, spill_bytes=int(spills.group(1)) if spills else None,
                shared=k.metadata.shared, cp_async=k.asm["ttgir"].count("async_copy_global_to_local"))


def main():
    from sparsespec_compile.kernels import pillars_triton as P, select_triton as S, attention_triton as A

    old = None
    if os.environ.get("OLD_KERNELS_DIR"):
        import sparsespec_compile.kernels as K
        from kernel_step import load_old_kernels

        old = load_old_kernels(K)
    base = dict(USE_SOFTCAP=False, USE_WINDOW=False, UPCAST=False, DOT_PREC="tf32", PAGE_SIZE=16)
    for shape, hq, g, d in (("smollm2", 9, 3, 64), ("qwen3-8b", 32, 4, 128)):
        bq, bm, one = P.score_blocks(g, 9)
        for bn, tiles, w, st in P._SCORE_SHAPES[:5]:
            c = dict(base, HQ=hq, HEAD_DIM=d, BLOCK_D=d, GROUP=g, BLOCK_Q=bq, BLOCK_M=bm, BLOCK_N=bn, TILES=tiles,
                     ONE_BLOCK=one)
            print(shape, f"scores N{bn}x{tiles}/w{w}/s{st}", compile_sm90(P._scores_kernel, c, w, st), flush=True)
            if old is not None:
                oc = dict(base, HQ=hq, HEAD_DIM=d, BLOCK_D=d, GROUP=g, GROUP_PAD=4, BLOCK_Q=16, BLOCK_M=64, BLOCK_N=bn,
                          TILES=tiles)
                print(shape, f"main scores N{bn}x{tiles}/w{w}", compile_sm90(old["pillars_triton"]._scores_kernel, oc,
                                                                            w, 2), flush=True)
        for bn, w, st in ((64, 2, 4), (128, 4, 2), (64, 8, 2)):
            c = dict(base, HEAD_DIM=d, BLOCK_D=d, GROUP=g, BLOCK_Q=16 // g, BLOCK_M=16, BLOCK_N=bn, HAS_SPARSE=True)
            print(shape, f"attention N{bn}/w{w}/s{st}", compile_sm90(A._attn_kernel, c, w, st), flush=True)
    for blk in (1024, 4096, 16384):
        w = max(1, min(16, blk // 1024))
        c = dict(BLOCK=blk, OUT_BLOCK=min(blk, 256 * w), HEAD_SPLIT=False)
        print(f"select resident {blk}/w{w}", compile_sm90(S._select_resident_kernel, c, w, 1), flush=True)


if __name__ == "__main__":
    main()
