"""RMSNorm in Triton: one program per row in the forward; the backward walks a block of rows per
program and writes one partial weight-gradient per program, summed afterwards in fp32.

Imports triton at module level: only `llmtrain.kernels` dispatch imports this module, and only once
Triton is known to be usable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 65536
"""A row must fit one block (the norm needs the whole row); larger widths are rejected."""


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * stride_y + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_part_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK: tl.constexpr,
):
    # dx = rstd * (w*dy - xhat * mean(w*dy*xhat)),  dw = sum over rows of dy * xhat
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for r in range(start, end):
        row = tl.cast(r, tl.int64)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        wdy = w * dy
        c = tl.sum(wdy * xhat, axis=0) / n_cols
        dx = (wdy - xhat * c) * rstd
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_part_ptr + pid * n_cols + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _num_programs(n_rows: int, device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over; few on the CPU interpreter (it runs them serially)."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        n_cols = shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(
                f"rms_norm weight shape {tuple(weight.shape)} does not match hidden size {n_cols}"
            )
        if n_cols > MAX_HIDDEN:
            raise ValueError(f"rms_norm Triton kernel supports hidden size <= {MAX_HIDDEN}, got {n_cols}")
        x2 = x.reshape(-1, n_cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        weight = weight.contiguous()
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        if n_rows > 0:
            _rms_norm_fwd[(n_rows,)](
                x2,
                weight,
                y,
                rstd,
                x2.stride(0),
                y.stride(0),
                n_cols,
                eps,
                BLOCK=block,
                num_warps=_num_warps(block),
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
        programs = _num_programs(n_rows, x2.device)
        dw_part = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(n_cols)
        if n_rows > 0:
            _rms_norm_bwd[(programs,)](
                dy2,
                x2,
                weight,
                rstd,
                dx,
                dw_part,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                triton.cdiv(n_rows, programs),
                BLOCK=block,
                num_warps=_num_warps(block),
            )
        dw = dw_part.sum(dim=0).to(weight.dtype)
        return dx.reshape(ctx.shape), dw, None
