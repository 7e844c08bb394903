"""Cross-entropy of one chunk of logits in Triton, for the chunked linear + cross-entropy.

One program per row: an online logsumexp over the vocabulary in blocks, then a second pass that
overwrites the logits with softmax - onehot(target), scaled by 1/(non-ignored tokens). Rows whose
target is ignore_index get loss 0 and gradient 0. The logits are read in fp32 whatever their dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_V = 8192


@triton.jit
def _ce_chunk_kernel(
    logits_ptr, stride_row, targets_ptr, loss_ptr, scale_ptr, n_cols, ignore_index, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    cols0 = tl.arange(0, BLOCK)

    m = float("-inf")  # running max
    d = 0.0  # running sum of exp(x - m)
    for start in range(0, n_cols, BLOCK):
        cols = start + cols0
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    picked = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))

    scale = tl.where(valid, tl.load(scale_ptr), 0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + cols0
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(base + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def chunk_cross_entropy_triton(
    logits: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Same contract as reference.chunk_cross_entropy_ref: in-place gradient, returns the summed loss."""
    n_rows, n_cols = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("chunk logits must have a contiguous last dimension")
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK_V)
    if n_rows > 0:
        _ce_chunk_kernel[(n_rows,)](
            logits,
            logits.stride(0),
            targets.contiguous(),
            losses,
            grad_scale.reshape(1),
            n_cols,
            ignore_index,
            BLOCK=block,
            num_warps=8 if block >= 4096 else 4,
        )
    return losses.sum()
