"""Compile the sampling kernels for an H100/H200 target (sm_90) without a GPU: catches what the CPU interpreter lets
through (a loop-carried value that changes type, an op the compiler lacks). Run with TRITON_INTERPRET unset:
    python tests/kernels/compile_sampling.py"""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparsespec_compile.kernels import sampling_triton as S

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, sig: dict, const: dict) -> None:
    triton.compile(ASTSource(fn, {**sig, **{k: "constexpr" for k in const}}, constexprs=dict(const)), target=TARGET)


ROW = dict(stride_l="i64", rows="*i64", inv_temp="*fp32")
SWEEP = dict(CHUNK=S.CHUNK, BLOCK=S.BLOCK)
for dt, upcast in (("bf16", True),):  # the models' dtype (fp32 differs only by the UPCAST constexpr)
    for filters in (True, False):  # False: top_k / top_p None (no row filters)
        fsig = dict(top_k="*i64", top_p="*fp32") if filters else {}
        fconst = dict(FILTERS=filters) if filters else dict(FILTERS=False, top_k=None, top_p=None)
        compile_one(S._sweep_kernel, dict(
            logits=f"*{dt}", **ROW, **fsig, greedy="*i1", seeds="*i64", parts="*fp32", hist="*i32", mhist="*i64",
            counter="*i32", V="i32", C="i32"), dict(**SWEEP, UPCAST=upcast, **fconst))
        compile_one(S._setup_kernel, dict(
            parts="*fp32", **fsig, greedy="*i1", seeds="*i64", fs="*fp32", st="*i64", tokens="*i64",
            stats="*fp32", V="i32", C="i32", CAP="i32"), dict(CP=64, **fconst))
    for level in range(4):
        compile_one(S._count_kernel, dict(logits=f"*{dt}", **ROW, st="*i64", hist="*i32", V="i32"),
                    dict(LEVEL=level, **SWEEP, UPCAST=upcast))
    compile_one(S._gather_kernel, dict(
        logits=f"*{dt}", **ROW, fs="*fp32", st="*i64", hist="*i32", parts="*fp32", counter="*i32", cand_v="*fp32",
        cand_i="*i32", V="i32", C="i32"), dict(**SWEEP, CAPB=S.CAPB, UPCAST=upcast))
    compile_one(S._final_kernel, dict(
        fs="*fp32", st="*i64", parts="*fp32", counter="*i32", cand_v="*fp32", cand_i="*i32", top_k="*i64",
        top_p="*fp32", seeds="*i64", tokens="*i64", stats="*fp32", V="i32", C="i32", FIX="fp32"),
        dict(CP=64, CAPB=S.CAPB, FB=256))
    for level in range(8):
        compile_one(S._mass_kernel, dict(logits=f"*{dt}", **ROW, fs="*fp32", st="*i64", mhist="*i64", V="i32",
                                         FIX="fp32"), dict(LEVEL=level, **SWEEP, UPCAST=upcast))
    compile_one(S._race_kernel, dict(
        logits=f"*{dt}", **ROW, seeds="*i64", fs="*fp32", st="*i64", mhist="*i64", parts="*fp32", V="i32", C="i32"),
        dict(**SWEEP, UPCAST=upcast))
    compile_one(S._race_final_kernel, dict(
        fs="*fp32", st="*i64", parts="*fp32", seeds="*i64", tokens="*i64", stats="*fp32", V="i32", C="i32"),
        dict(CP=64))
    compile_one(S._residual_kernel, dict(
        t_logits=f"*{dt}", stride_t="i64", t_rows="*i64", t_stats="*fp32", d_logits=f"*{dt}", stride_d="i64",
        d_rows="*i64", d_stats="*fp32", inv_temp="*fp32", seeds="*i64", need="*i1", tokens="*i64", V="i32"),
        dict(BLOCK=S.BLOCK, UPCAST=upcast))
print("compiled")
