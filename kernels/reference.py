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
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad_scale: torch.Tensor,
    ignore_index: int,
    softcap: float | None = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Per-row cross-entropy of one chunk of logits (C, V); returns the summed loss (fp32 scalar).

    Overwrites `logits` in place with d(loss_sum * grad_scale)/d(logits), so the chunk buffer is reused
    for the gradient (the contract the Triton kernel also follows). Ignored rows get zero loss and zero
    gradient. With `softcap` c the rows are first soft-capped, z = c * tanh(logits / c) (Gemma 2), and the
    gradient carries the tanh's factor 1 - (z/c)^2; with `z_loss` each row adds z_loss * logsumexp(z)^2
    (PaLM), whose gradient is 2 * z_loss * logsumexp(z) * softmax(z). Written in place, chunk by chunk,
    so that neither costs a pass over freshly allocated (tokens x vocab) memory.
    """
    x = logits.float()  # the same tensor when the logits are fp32: then everything below is in place
    tanh = None
    if softcap is not None:
        # tanh(l/c) as 2*sigmoid(2l/c) - 1: twice as fast as torch.tanh on a CPU, within fp32 rounding
        tanh = x.mul_(2.0 / softcap).sigmoid_().mul_(2.0).sub_(1.0)  # x now holds tanh(logits / c)
        x = tanh * softcap  # z, one chunk-sized buffer
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    picked = x.gather(1, safe[:, None])[:, 0]
    # one exp per logit: e = exp(z - max), lse = max + log(sum e), softmax = e / sum e
    peak = x.amax(dim=-1, keepdim=True)
    exp = x.sub_(peak).exp_()
    total = exp.sum(dim=-1)
    lse = peak[:, 0] + total.log()
    row_loss = lse - picked
    if z_loss:
        row_loss = row_loss + z_loss * lse.square()
    loss_sum = torch.where(valid, row_loss, torch.zeros_like(lse)).sum()
    row_scale = valid.to(exp.dtype) * grad_scale
    coef = row_scale / total  # softmax and the scale in one pass
    if z_loss:
        coef = coef * (1.0 + 2.0 * z_loss * lse)
    grad = exp.mul_(coef[:, None])
    grad[torch.arange(grad.shape[0], device=grad.device), safe] -= row_scale  # the target's -1
    if tanh is not None:
        tanh.square_()
        # d z / d logits = 1 - tanh^2; lands in the logits buffer when they are fp32 (tanh is that buffer)
        torch.addcmul(grad, grad, tanh, value=-1.0, out=tanh)
        grad = tanh
    if grad is not logits:
        logits.copy_(grad)
    return loss_sum
