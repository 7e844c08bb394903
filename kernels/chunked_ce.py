"""Linear layer + cross-entropy without the (tokens x vocab) logits.

The rows (tokens) are processed in chunks of `chunk_size`. For each chunk the forward pass computes
the chunk's logits `h_c @ W.T`, runs a per-row cross-entropy that overwrites the logits with their
gradient, and immediately contracts that gradient into the gradients of the hidden states
(`dlogits_c @ W`, rows of the final `grad_hidden`) and of the weight (`dlogits_c.T @ h_c`, accumulated).
The backward pass then only scales the stored gradients by the incoming scalar gradient.

Memory held at the peak, with N tokens, hidden size D, vocabulary V, chunk C and s = bytes per element
of the input dtype (2 for bf16, 4 for fp32):
    fused:  C*V*s (chunk logits, reused as their gradient) [the PyTorch fallback adds an fp32 copy
            when s < 4, and torch.logsumexp a transient fp32 C*V]
            + N*D*s (grad_hidden) + V*D*4 (fp32 grad_weight accumulator) [+ V*D*s for the per-chunk
            product when the weight is not fp32]
    naive:  at least N*V*(s + 8): the logits, their fp32 copy and the fp32 log-softmax that
            F.cross_entropy keeps for the backward (which then adds fp32 and s-byte gradients of the
            same size).
With N = 8 x 2048 tokens, V = 128256 and D = 4096 in bf16 the naive forward needs about 19.6 GiB for
logits; the fused path about 4.0 GiB (C = 4096), mostly the weight gradient, which is V x D whatever
the token count.

Chunk size: by default chosen so that a chunk of logits is about as large as the hidden states
(C ~ N / ceil(V / D), rounded up to a power of two), so the transient memory stays in proportion to
what the model already holds; but at least MIN_CHUNK_CUDA = 4096 rows on a GPU (MIN_CHUNK_CPU = 256 on
the CPU) so that the per-chunk weight-gradient update stays cheap next to the matmuls, and at most N.

The gradient of the weight is accumulated in fp32 across chunks (then cast to the weight's dtype):
summing many bf16 partial products in bf16 would lose precision as the number of chunks grows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ChunkCE = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(logits (C, V) overwritten with their gradient, targets (C,), grad_scale (0-d fp32), ignore_index)
-> summed loss of the chunk (0-d fp32)."""

MIN_CHUNK_CUDA = 4096
"""Floor of the automatic chunk on a GPU. Each chunk costs 6*C*D*V flops of matmuls and about 12*V*D
bytes of weight-gradient accumulation (bf16 product written and read, fp32 sum read and written): on an
H100 (~990 TFLOP/s, 3.35 TB/s) that traffic is ~58% of the matmul time at C = 1024 and ~15% at 4096."""
MIN_CHUNK_CPU = 256
"""Floor on the CPU, where memory bandwidth is cheap next to matmul time: only keeps the matmuls efficient."""


def _accumulate_weight_grad(grad_w: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad_w (fp32) += dlogits.T @ h, whatever the dtype of the chunk."""
    if dlogits.dtype == grad_w.dtype:
        return grad_w.addmm_(dlogits.t(), h)
    # The bf16 product rounds once (the GEMM accumulates in fp32 inside), the running sum stays fp32.
    # On CUDA, addmm with out_dtype=float32 into grad_w would save the temporary, but it is not used
    # until it can be verified on a GPU.
    grad_w += dlogits.t() @ h
    return grad_w


def default_chunk_size(
    num_tokens: int, hidden_size: int, vocab_size: int, min_rows: int = MIN_CHUNK_CUDA
) -> int:
    """Rows per chunk so that chunk logits (C x V) are about the size of the hidden states (N x D),
    at least min_rows and at most num_tokens."""
    num_chunks = max(1, -(-vocab_size // hidden_size))
    rows = max(1, -(-num_tokens // num_chunks))
    rows = 1 << (rows - 1).bit_length()
    return max(1, min(num_tokens, max(rows, min_rows)))


def check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    autocast: bool = False,
) -> None:
    """Shapes and target range; out-of-range targets would otherwise read outside the logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"fused_linear_cross_entropy wants hidden (N, D), weight (V, D), targets (N,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"fused_linear_cross_entropy shape mismatch: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype and not autocast:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them")
    vocab = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if targets.is_cuda:
        # No host sync on the GPU: a device-side assert fires if a target is out of range.
        torch._assert_async(~bad.any(), f"target out of range [0, {vocab}) and not ignore_index")
    elif bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(f"target {first} out of range [0, {vocab}) and not ignore_index={ignore_index}")


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, gradients computed in the forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        chunk_size: int,
        chunk_ce: ChunkCE,
        need_grad: bool,
        mean: bool,
    ) -> torch.Tensor:
        num_tokens, _ = hidden.shape
        need_h = need_grad and ctx.needs_input_grad[0]
        need_w = need_grad and ctx.needs_input_grad[1]
        n_valid = (targets != ignore_index).sum()
        # Ignored rows get zero gradient, so clamping only matters when every row is ignored: the mean
        # is then 0/0 = nan and the gradients zero, exactly as F.cross_entropy.
        if mean:
            grad_scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
        else:
            grad_scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            h = hidden[start:end]
            logits = h @ weight.t()  # (C, V), becomes d(loss)/d(logits) below
            loss_sum += chunk_ce(logits, targets[start:end], grad_scale, ignore_index)
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[start:end])
            if grad_w is not None:
                grad_w = _accumulate_weight_grad(grad_w, logits, h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid.to(torch.float32) if mean else loss_sum

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_ce: ChunkCE,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Flatten leading dims, check inputs, pick the chunk size and run the fused autograd function.

    reduction "mean" divides by the scored (non-ignored) tokens, "sum" leaves that to the caller (who
    may prefer 0 to nan for a batch without any)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    check_inputs(
        hidden, weight, targets, ignore_index, autocast=torch.is_autocast_enabled(hidden.device.type)
    )
    if chunk_size is None:
        floor = MIN_CHUNK_CUDA if hidden.is_cuda else MIN_CHUNK_CPU
        chunk_size = default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0], floor)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    mean = reduction == "mean"
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return ChunkedLinearCrossEntropy.apply(
            hidden, weight, targets, ignore_index, chunk_size, chunk_ce, need_grad, mean
        )
    # Under autocast the matmuls run in the autocast dtype, as a plain linear layer would; the casts stay
    # outside the function so autograd carries the gradients back to fp32 parameters.
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        return ChunkedLinearCrossEntropy.apply(
            hidden.to(dtype), weight.to(dtype), targets, ignore_index, chunk_size, chunk_ce, need_grad, mean
        )
