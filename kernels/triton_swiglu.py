"""SwiGLU (silu(gate) * up) in Triton. The backward recomputes silu from the saved inputs instead of
saving the activation, so the MLP keeps only gate and up (which its matmuls need anyway).

Inputs may be row-strided views (e.g. the two halves of one fused gate/up projection): only the last
dimension has to be contiguous, so no copy is made for them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, y_ptr, stride_g, stride_u, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, stride_dy, stride_g, stride_u, n_cols, BLOCK: tl.constexpr
):
    # d/dg [g*sig(g)] = sig(g) * (1 + g*(1 - sig(g)))
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    out = row * n_cols + cols  # dg and du are fresh contiguous (rows, n_cols) tensors
    tl.store(dg_ptr + out, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + out, du.to(du_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, last dim) view with a unit last stride, copying only when that is impossible."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(
                f"swiglu wants gate and up of one shape and dtype; got {tuple(gate.shape)} {gate.dtype} "
                f"and {tuple(up.shape)} {up.dtype}"
            )
        g2, u2 = _rows(gate), _rows(up)
        n_rows, n_cols = g2.shape
        y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        if y.numel() > 0:
            grid = (n_rows, triton.cdiv(n_cols, BLOCK))
            _swiglu_fwd[grid](g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), n_cols, BLOCK=BLOCK)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return y.reshape(gate.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        n_rows, n_cols = g2.shape
        dy2 = _rows(dy)
        dg = torch.empty((n_rows, n_cols), dtype=g2.dtype, device=g2.device)
        du = torch.empty((n_rows, n_cols), dtype=u2.dtype, device=u2.device)
        if dg.numel() > 0:
            grid = (n_rows, triton.cdiv(n_cols, BLOCK))
            _swiglu_bwd[grid](
                dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), n_cols, BLOCK=BLOCK
            )
        return dg.reshape(ctx.shape), du.reshape(ctx.shape)
