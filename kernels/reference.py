"""Plain PyTorch versions of every kernel: the numerical reference for tests and the fallback where
Triton or a GPU is missing.

Numerics shared with the Triton kernels: RMSNorm and SwiGLU compute in fp32 and round once to the
input dtype at the end; cross-entropy reads the logits of each chunk in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32, cast to x.dtype."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, in fp32, cast to gate.dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def naive_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """The unfused baseline: materializes all (tokens x vocab) logits, then F.cross_entropy in fp32."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    return F.cross_entropy(logits.float(), targets.reshape(-1), ignore_index=ignore_index)


def chunk_cross_entropy_ref(
    logits: torch.Tensor, targets: torch.Tensor, grad_scale: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Per-row cross-entropy of one chunk of logits (C, V); returns the summed loss (fp32 scalar).

    Overwrites `logits` in place with d(loss_sum * grad_scale)/d(logits), so the chunk buffer is reused
    for the gradient (the contract the Triton kernel also follows). Ignored rows get zero loss and zero
    gradient.
    """
    x = logits.float()  # the same tensor when the logits are fp32: then everything below is in place
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    picked = x.gather(1, safe[:, None])[:, 0]
    loss_sum = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    grad = x.sub_(lse[:, None]).exp_()  # softmax
    grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1.0
    grad *= (valid.to(grad.dtype) * grad_scale)[:, None]
    if grad is not logits:
        logits.copy_(grad)
    return loss_sum
