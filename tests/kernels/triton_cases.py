"""Triton kernels against their PyTorch references, forward and gradients.

Not collected by a plain `pytest` run (the name does not match test_*.py): test_kernels_triton.py runs
this file in a subprocess with TRITON_INTERPRET=1, because Triton decides between compiling and
interpreting when a kernel is decorated, and the variable must not leak into the rest of the suite.
On a machine with a GPU, `pytest tests/kernels/triton_cases.py` runs the same checks compiled.

Tolerances: fp32 rtol=atol=1e-5. bf16 rtol=2e-2 and atol=2% of the largest reference magnitude: both
sides compute in fp32 and round once, which alone differs by up to one bf16 ulp (2^-8..2^-7 relative),
and the interpreter rounds fp32->bf16 by truncation rather than to nearest even, one more ulp.
"""

from __future__ import annotations

import os

import pytest
import torch

from llmtrain import kernels as K

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

pytestmark = pytest.mark.skipif(
    not K.available() or not K._use_triton(torch.zeros(1, device=DEVICE)),
    reason="needs triton with a CUDA device or TRITON_INTERPRET=1",
)

DTYPES = [torch.float32, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2 * scale)


def grads_of(fn, inputs: list[torch.Tensor], dy: torch.Tensor | None = None):
    """Output and input gradients of fn(*inputs) for an upstream gradient dy (or a scalar output)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dy if dy is not None else None)
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 100), (2, 5, 64), (3, 1000)])
def test_rms_norm_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y, (gx, gw) = grads_of(lambda a, b: K.rms_norm(a, b, 1e-6), [x, w], dy)
    y_ref, (gx_ref, gw_ref) = grads_of(lambda a, b: K.rms_norm_ref(a, b, 1e-6), [x, w], dy)
    assert_close(y, y_ref, dtype)
    assert_close(gx, gx_ref, dtype)
    assert_close(gw, gw_ref, dtype)


def test_rms_norm_bf16_input_with_fp32_weight():
    torch.manual_seed(5)
    x = torch.randn(9, 100, device=DEVICE).bfloat16()
    w = 1 + 0.1 * torch.randn(100, device=DEVICE)
    dy = torch.randn(9, 100, device=DEVICE).bfloat16()
    y, (gx, gw) = grads_of(lambda a, b: K.rms_norm(a, b, 1e-6), [x, w], dy)
    y_ref, (gx_ref, gw_ref) = grads_of(lambda a, b: K.rms_norm_ref(a, b, 1e-6), [x, w], dy)
    assert_close(y, y_ref, torch.bfloat16)
    assert_close(gx, gx_ref, torch.bfloat16)
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_reads_row_strided_input():
    torch.manual_seed(1)
    base = torch.randn(37, 128, device=DEVICE)
    x = base[:, :100]  # row stride 128, not contiguous
    w = torch.randn(100, device=DEVICE)
    torch.testing.assert_close(K.rms_norm(x, w, 1e-5), K.rms_norm_ref(x, w, 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 100), (3, 5, 1500)])
def test_swiglu_matches_reference(shape, dtype):
    torch.manual_seed(2)
    g = (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    u = torch.randn(shape, device=DEVICE).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    y, (gg, gu) = grads_of(K.swiglu, [g, u], dy)
    y_ref, (gg_ref, gu_ref) = grads_of(K.swiglu_ref, [g, u], dy)
    assert_close(y, y_ref, dtype)
    assert_close(gg, gg_ref, dtype)
    assert_close(gu, gu_ref, dtype)


def test_swiglu_on_halves_of_a_fused_projection():
    """gate and up as views into one (rows, 2F) tensor: gradients land in the right halves."""
    torch.manual_seed(3)
    gu = torch.randn(37, 2 * 100, device=DEVICE, requires_grad=True)
    dy = torch.randn(37, 100, device=DEVICE)
    K.swiglu(gu[:, :100], gu[:, 100:]).backward(dy)
    grad = gu.grad.clone()
    gu.grad = None
    K.swiglu_ref(gu[:, :100], gu[:, 100:]).backward(dy)
    torch.testing.assert_close(grad, gu.grad, rtol=1e-5, atol=1e-5)


CE_CASES = [
    # (tokens N, hidden D, vocab V, chunk_size, logit scale): odd sizes, several chunks, a vocabulary
    # wider than one kernel block (8192) so the online logsumexp runs over several blocks.
    (37, 100, 1000, 8, 1.0),
    (37, 100, 1000, None, 1.0),
    (6, 32, 50257, 4, 1.0),
    (13, 24, 777, 5, 30.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,v,chunk,scale", CE_CASES)
def test_fused_linear_cross_entropy_matches_naive(n, d, v, chunk, scale, dtype):
    torch.manual_seed(4)
    h = torch.randn(n, d, device=DEVICE).to(dtype)
    w = (scale * torch.randn(v, d, device=DEVICE) / d**0.5).to(dtype)
    t = torch.randint(0, v, (n,), device=DEVICE)
    t[::4] = -100  # ignored tokens, including whole ignored rows inside chunks
    loss, (gh, gw) = grads_of(lambda a, b: K.fused_linear_cross_entropy(a, b, t, chunk_size=chunk), [h, w])
    loss_ref, (gh_ref, gw_ref) = grads_of(lambda a, b: K.naive_linear_cross_entropy(a, b, t), [h, w])
    # The loss is fp32 either way; in bf16 a chunk matmul may round a logit one ulp away from the full one.
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-2, 1e-3)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    assert_close(gh, gh_ref, dtype)
    assert_close(gw, gw_ref, dtype)


def test_fused_linear_cross_entropy_all_ignored_is_nan_with_zero_grads():
    h = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(300, 16, device=DEVICE, requires_grad=True)
    t = torch.full((5,), -100, device=DEVICE)
    loss = K.fused_linear_cross_entropy(h, w, t, chunk_size=2)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0
