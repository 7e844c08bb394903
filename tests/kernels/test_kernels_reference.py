"""The PyTorch references and the chunked cross-entropy fallback, in-process on the CPU (no Triton)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmtrain import kernels as K
from llmtrain.kernels.chunked_ce import default_chunk_size


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    """Dispatch reads TRITON_INTERPRET per call: unset it so CPU tensors take the PyTorch path here."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_import_does_not_load_triton():
    code = "import sys, llmtrain.kernels as k; print('triton' in sys.modules, k.available())"
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    loaded, available = out.stdout.split()
    assert loaded == "False"
    assert available == str(torch.cuda.is_available() and K._triton_importable())


def test_cpu_tensors_use_the_reference():
    assert not K._use_triton(torch.zeros(2))
    x = torch.randn(3, 8)
    w = torch.randn(8)
    assert torch.equal(K.rms_norm(x, w, 1e-5), K.rms_norm_ref(x, w, 1e-5))


def test_rms_norm_ref_formula_and_dtype():
    x = torch.tensor([[3.0, 4.0], [1.0, -1.0]])
    w = torch.tensor([1.0, 2.0])
    y = K.rms_norm_ref(x, w, 0.0)
    # rms of (3, 4) is sqrt(12.5); of (1, -1) is 1
    expected = torch.tensor([[3 / 12.5**0.5, 8 / 12.5**0.5], [1.0, -2.0]])
    torch.testing.assert_close(y, expected)
    assert K.rms_norm_ref(x.bfloat16(), w.bfloat16(), 1e-5).dtype == torch.bfloat16


def test_swiglu_ref_is_silu_gate_times_up():
    g = torch.tensor([0.0, 1.0, -2.0])
    u = torch.tensor([5.0, 2.0, 3.0])
    sig = 1 / (1 + torch.exp(-g))
    torch.testing.assert_close(K.swiglu_ref(g, u), g * sig * u)


def _ce_inputs(n, d, v, dtype=torch.float32, seed=0, ignore_every=3):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=gen) / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=gen)
    t[::ignore_every] = -100
    return h, w, t


def _loss_and_grads(fn, h, w, t, **kw):
    h.grad = w.grad = None
    loss = fn(h, w, t, **kw)
    loss.backward()
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize(
    "n,d,v,chunk", [(37, 100, 1000, 8), (37, 100, 1000, 37), (37, 100, 1000, 1000), (64, 16, 50257, None)]
)
def test_chunked_ce_equals_naive_fp32(n, d, v, chunk):
    h, w, t = _ce_inputs(n, d, v)
    loss, gh, gw = _loss_and_grads(K.fused_linear_cross_entropy, h, w, t, chunk_size=chunk)
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    h.grad = w.grad = None
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-7)


def test_chunked_ce_bf16_close_to_naive():
    h, w, t = _ce_inputs(37, 100, 1000, dtype=torch.bfloat16)
    loss, gh, gw = _loss_and_grads(K.fused_linear_cross_entropy, h, w, t, chunk_size=8)
    ref, rh, rw = _loss_and_grads(K.naive_linear_cross_entropy, h, w, t)
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    for got, want in ((gh, rh), (gw, rw)):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * scale)


def test_chunked_ce_takes_leading_dims_and_scales_by_upstream_grad():
    h, w, t = _ce_inputs(12, 8, 50)
    loss = K.fused_linear_cross_entropy(h.reshape(3, 4, 8), w, t.reshape(3, 4), chunk_size=5)
    (2.5 * loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (2.5 * F.cross_entropy(h @ w.t(), t)).backward()
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_chunked_ce_all_ignored_matches_torch_nan_and_zero_grads():
    h, w, t = _ce_inputs(6, 8, 20, ignore_every=1)
    loss, gh, gw = _loss_and_grads(K.fused_linear_cross_entropy, h, w, t, chunk_size=4)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(h @ w.t(), t))
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def _capped_z_loss(h, w, t, softcap, z_loss, reduction="mean"):
    """The formula on materialized logits, differentiated by autograd."""
    logits = h.float() @ w.float().t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    scored = t != -100
    total = (
        F.cross_entropy(logits, t, reduction="sum")
        + z_loss * (torch.logsumexp(logits, -1) ** 2 * scored).sum()
    )
    return total / scored.sum() if reduction == "mean" else total


@pytest.mark.parametrize("softcap, z_loss", [(2.0, 0.0), (None, 1e-2), (4.0, 1e-1)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_ce_softcap_and_z_loss_equal_the_formula(softcap, z_loss, reduction):
    h, w, t = _ce_inputs(37, 16, 300)
    with torch.no_grad():
        w.mul_(8)  # logits of several units: the soft-cap bends them
    kw = dict(softcap=softcap, z_loss=z_loss, reduction=reduction)
    loss, gh, gw = _loss_and_grads(K.fused_linear_cross_entropy, h, w, t, chunk_size=8, **kw)
    ref, rh, rw = _loss_and_grads(_capped_z_loss, h, w, t, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in ((gh, rh), (gw, rw)):  # fp32 rounding, relative to the largest gradient
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_chunked_ce_softcap_bf16_close_to_the_formula():
    h, w, t = _ce_inputs(37, 16, 300, dtype=torch.bfloat16)
    loss, gh, gw = _loss_and_grads(K.fused_linear_cross_entropy, h, w, t, chunk_size=8, softcap=1.5)
    ref, rh, rw = _loss_and_grads(_capped_z_loss, h, w, t, softcap=1.5, z_loss=0.0)
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    for got, want in ((gh, rh), (gw, rw)):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * scale)


def test_chunked_ce_sum_of_an_all_ignored_batch_is_zero():
    h, w, t = _ce_inputs(6, 8, 20, ignore_every=1)
    loss, gh, gw = _loss_and_grads(K.fused_linear_cross_entropy, h, w, t, chunk_size=4, reduction="sum")
    assert loss.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_chunked_ce_grad_only_where_required():
    h, w, t = _ce_inputs(10, 8, 30)
    frozen = w.detach()
    K.fused_linear_cross_entropy(h, frozen, t, chunk_size=3).backward()
    assert h.grad is not None and frozen.grad is None
    with torch.no_grad():
        loss = K.fused_linear_cross_entropy(h, w, t, chunk_size=3)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), t).detach())


def test_chunked_ce_rejects_out_of_range_targets_and_bad_shapes():
    h, w, t = _ce_inputs(4, 8, 30)
    with pytest.raises(ValueError, match="target 30 out of range"):
        K.fused_linear_cross_entropy(h, w, torch.tensor([1, 30, 2, -100]))
    with pytest.raises(ValueError, match="shape mismatch"):
        K.fused_linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        K.fused_linear_cross_entropy(h, w, t, chunk_size=0)


def test_default_chunk_size_bounds_chunk_logits_by_hidden_states():
    # GPT-2 small, 8 x 1024 tokens: ceil(50304 / 768) = 66 chunks -> 125 rows -> 128, raised to the floor
    assert default_chunk_size(8192, 768, 50304, min_rows=256) == 256
    assert default_chunk_size(8192, 768, 50304) == 4096  # the GPU floor
    # Llama-3-8B, 64 x 2048 tokens: 32 chunks of 4096 rows; chunk logits 4096 x 128256 ~ N x D
    assert default_chunk_size(131072, 4096, 128256) == 4096
    assert default_chunk_size(262144, 4096, 128256, min_rows=256) == 8192
    assert default_chunk_size(10, 4096, 128256) == 10  # never more rows than there are


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, tuple | list) else [out]:
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def test_chunked_ce_never_materializes_full_logits():
    n, d, v, chunk = 64, 16, 2000, 8
    h, w, t = _ce_inputs(n, d, v)
    with _LargestTensor() as fused:
        K.fused_linear_cross_entropy(h, w, t, chunk_size=chunk).backward()
    with _LargestTensor() as naive:
        K.naive_linear_cross_entropy(h, w, t).backward()
    assert naive.largest == n * v
    assert fused.largest == max(chunk * v, v * d)


def test_chunked_ce_under_autocast_runs_in_bf16_and_returns_fp32_grads():
    h, w, t = _ce_inputs(20, 16, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gh, gw = _loss_and_grads(K.fused_linear_cross_entropy, h, w, t, chunk_size=6)
        ref, rh, rw = _loss_and_grads(K.naive_linear_cross_entropy, h, w, t)
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    for got, want in ((gh, rh), (gw, rw)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
