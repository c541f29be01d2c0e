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


for dt, upcast in (("bf16", True),):  # the models' dtype (fp32 differs only by the UPCAST constexpr)
    compile_one(S._sample_kernel, dict(
        logits=f"*{dt}", stride_l="i64", rows="*i64", inv_temp="*fp32", top_k="*i64", top_p="*fp32", greedy="*i1",
        seeds="*i64", need_stats="*i1", tokens="*i64", stats="*fp32", V="i32"),
        dict(BLOCK=S.BLOCK, BLOCK_S=S.BLOCK_S, NPIV=S.NPIV, UPCAST=upcast))
    compile_one(S._residual_kernel, dict(
        t_logits=f"*{dt}", stride_t="i64", t_rows="*i64", t_stats="*fp32", d_logits=f"*{dt}", stride_d="i64",
        d_rows="*i64", d_stats="*fp32", inv_temp="*fp32", seeds="*i64", need="*i1", tokens="*i64", V="i32"),
        dict(BLOCK=S.BLOCK, UPCAST=upcast))
print("compiled")
