"""Fused Triton kernels (RMSNorm, SwiGLU, chunked linear + cross-entropy), installed as
`llmtrain.kernels`. Each has a plain PyTorch reference; importing this package never needs Triton.

Dispatch, per call: the Triton kernel runs when Triton imports and the tensors are on a CUDA device,
or when TRITON_INTERPRET=1 is set (Triton's interpreter then runs the kernels on CPU tensors, slowly:
for tests). Otherwise the PyTorch reference runs. The fused cross-entropy is chunked in both cases, so
the memory saving holds on every device; only the per-chunk softmax differs.

Tolerances against the references (tests/kernels): fp32 within 1e-5 (relative and absolute); bf16
rtol 2e-2 and atol 2% of the largest reference magnitude, i.e. two bf16 ulps: both sides compute in
fp32 and round once (up to one ulp apart), and Triton's CPU interpreter rounds fp32 -> bf16 by
truncation where GPUs round to nearest even (one more). The fused cross-entropy loss is fp32: 1e-5
against F.cross_entropy for fp32 inputs, rtol 1e-2 for bf16 inputs (a chunk matmul may round a logit
differently from the full one).
"""

from __future__ import annotations

import functools
import os

import torch

from .chunked_ce import chunked_linear_cross_entropy, default_chunk_size
from .reference import chunk_cross_entropy_ref, naive_linear_cross_entropy, rms_norm_ref, swiglu_ref

__all__ = [
    "available",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "naive_linear_cross_entropy",
    "rms_norm",
    "rms_norm_ref",
    "swiglu",
    "swiglu_ref",
]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while loading its backends
        return False
    return True


def available() -> bool:
    """True when the Triton kernels can run here: Triton imports and a CUDA device (or the interpreter)."""
    return _triton_importable() and (_interpret() or torch.cuda.is_available())


def _use_triton(*tensors: torch.Tensor) -> bool:
    if _interpret():
        return _triton_importable()
    return all(t.is_cuda for t in tensors) and _triton_importable()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x.dtype."""
    if _use_triton(x, weight):
        from .triton_rmsnorm import RMSNormFunction

        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32, returned in gate.dtype."""
    if _use_triton(gate, up):
        from .triton_swiglu import SwiGLUFunction

        return SwiGLUFunction.apply(gate, up)
    return swiglu_ref(gate, up)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    reduction: str = "mean",
    triton: bool = True,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets` over non-ignored tokens, without
    materializing the (tokens x vocab) logits.

    hidden (N, D) or (..., D); weight (V, D) (a slice weight[:vocab] of a padded head is fine);
    targets (N,) or (...) with ignore_index marking tokens that do not count. chunk_size None picks
    default_chunk_size(N, D, V, floor) with floor 4096 rows on CUDA, 256 on the CPU. Same value and
    gradients as F.cross_entropy(hidden @ weight.T) (nan when every target is ignored, as there);
    reduction "sum" returns the summed loss instead of the mean. `softcap` c scores c * tanh(logits / c);
    `z_loss` adds z_loss * logsumexp^2 per scored row. Those two run the PyTorch chunk on every device
    (the Triton kernel computes the plain cross-entropy), still chunk by chunk. triton=False runs the
    PyTorch chunk even where the Triton kernel could.
    """
    if triton and _use_triton(hidden, weight) and softcap is None and not z_loss:
        from .triton_ce import chunk_cross_entropy_triton

        chunk_ce = chunk_cross_entropy_triton
    elif softcap is None and not z_loss:
        chunk_ce = chunk_cross_entropy_ref
    else:
        chunk_ce = functools.partial(chunk_cross_entropy_ref, softcap=softcap, z_loss=z_loss)
    return chunked_linear_cross_entropy(
        hidden, weight, targets, chunk_ce, ignore_index, chunk_size, reduction
    )
