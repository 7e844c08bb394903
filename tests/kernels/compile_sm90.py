"""Compiles every Triton kernel ahead of time for an H100 (sm_90) target, no GPU needed.

The interpreter checks the numbers but not that a kernel lowers through Triton's compiler and ptxas;
this does, for fp32 and bf16 pointers and the block sizes the wrappers pick. Run as a script (by
test_kernels_triton.py, in a child process without TRITON_INTERPRET); prints one line per kernel.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmtrain.kernels import triton_ce, triton_rmsnorm, triton_swiglu

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, signature: dict[str, str], block: int, num_warps: int) -> int:
    """Size in bytes of the cubin for fn with the given argument types and BLOCK."""
    src = ASTSource(fn=fn, signature={**signature, "BLOCK": "constexpr"}, constexprs={"BLOCK": block})
    return len(triton.compile(src, target=TARGET, options={"num_warps": num_warps}).asm["cubin"])


def main() -> None:
    for dt in ("fp32", "bf16"):
        p = "*" + dt
        kernels = {
            "ce_chunk": (
                triton_ce._ce_chunk_kernel,
                dict(
                    logits_ptr=p,
                    stride_row="i32",
                    targets_ptr="*i64",
                    loss_ptr="*fp32",
                    scale_ptr="*fp32",
                    n_cols="i32",
                    ignore_index="i32",
                ),
                triton_ce.MAX_BLOCK_V,
                8,
            ),
            "rms_norm_fwd": (
                triton_rmsnorm._rms_norm_fwd,
                dict(
                    x_ptr=p,
                    w_ptr=p,
                    y_ptr=p,
                    rstd_ptr="*fp32",
                    stride_x="i64",
                    stride_y="i32",
                    n_cols="i32",
                    eps="fp32",
                ),
                4096,
                8,
            ),
            "rms_norm_bwd": (
                triton_rmsnorm._rms_norm_bwd,
                dict(
                    dy_ptr=p,
                    x_ptr=p,
                    w_ptr=p,
                    rstd_ptr="*fp32",
                    dx_ptr=p,
                    dw_part_ptr="*fp32",
                    stride_dy="i32",
                    stride_x="i32",
                    stride_dx="i32",
                    n_rows="i32",
                    n_cols="i32",
                    rows_per_program="i32",
                ),
                4096,
                8,
            ),
            "swiglu_fwd": (
                triton_swiglu._swiglu_fwd,
                dict(g_ptr=p, u_ptr=p, y_ptr=p, stride_g="i32", stride_u="i32", stride_y="i32", n_cols="i32"),
                triton_swiglu.BLOCK,
                4,
            ),
            "swiglu_bwd": (
                triton_swiglu._swiglu_bwd,
                dict(
                    dy_ptr=p,
                    g_ptr=p,
                    u_ptr=p,
                    dg_ptr=p,
                    du_ptr=p,
                    stride_dy="i32",
                    stride_g="i32",
                    stride_u="i32",
                    n_cols="i32",
                ),
                triton_swiglu.BLOCK,
                4,
            ),
        }
        for name, (fn, sig, block, warps) in kernels.items():
            size = compile_kernel(fn, sig, block, warps)
            print(f"compiled {name} {dt} sm_90 cubin {size} bytes")


if __name__ == "__main__":
    main()
