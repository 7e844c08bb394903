"""The optional model features of newer recipes do what their papers say, and cost nothing when off."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmtrain.errors import ConfigError
from llmtrain.model import ModelConfig, build_model
from llmtrain.model.config import check_model_config
from llmtrain.model.transformer import KVCache

VOCAB = 96


def cfg(**overrides) -> ModelConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=32, vocab_size=VOCAB)
    return ModelConfig(**{**base, **overrides})


def tokens(seed: int = 0, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    x = tokens()
    change = {}
    for qk_norm in (True, False):
        torch.manual_seed(0)
        model = build_model(cfg(qk_norm=qk_norm)).eval()
        before = model(x)
        model.blocks[0].attn.qkv.weight[: 32 + 16].mul_(7.0)  # query rows (H*Q = 32), key rows (K*Q = 16)
        change[qk_norm] = (model(x) - before).abs().max().item()
    # what is left with QK-norm is the norm's epsilon against small initial activations
    assert change[True] < 1e-2 * change[False], change


@torch.no_grad()
def test_relu2_mlp_is_down_of_squared_relu_of_up():
    model = build_model(cfg(activation="relu2")).eval()
    mlp = model.blocks[0].mlp
    assert not hasattr(mlp, "gate") and mlp.up.weight.shape == (4 * 32, 32)  # 4 x d, not gated
    h = torch.randn(3, 5, 32)
    torch.testing.assert_close(mlp(h), mlp.down(F.relu(mlp.up(h)) ** 2))


@torch.no_grad()
def test_logit_softcap_bounds_logits_and_equals_cap_tanh_of_the_plain_logits():
    torch.manual_seed(0)
    capped = build_model(cfg(logit_softcap=2.0)).eval()
    plain = build_model(cfg()).eval()
    plain.load_state_dict(capped.state_dict())
    for p in (capped.lm_head.weight, plain.lm_head.weight):
        p.mul_(50)  # large raw logits
    x = tokens()
    raw = plain(x)[..., :VOCAB]
    got = capped(x)[..., :VOCAB]
    assert raw.abs().max() > 2.0 and got.abs().max() <= 2.0
    torch.testing.assert_close(got, 2.0 * torch.tanh(raw / 2.0))
    targets = tokens(1)
    expected = F.cross_entropy(got.reshape(-1, VOCAB), targets.reshape(-1))
    torch.testing.assert_close(capped(x, targets), expected)


@torch.no_grad()
def test_kv_cache_decoding_matches_the_full_forward_with_every_option_on():
    model = build_model(cfg(qk_norm=True, activation="relu2", logit_softcap=5.0)).eval()
    x = tokens(shape=(2, 12))
    full = model(x)[..., :VOCAB]
    cache = KVCache(model.cfg, 2, 12, x.device, torch.float32)
    steps = [model.decode_step(x[:, :5], cache)] + [
        model.decode_step(x[:, t : t + 1], cache) for t in range(5, 12)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_zero_init_head_starts_at_the_uniform_loss_and_zero_init_proj_makes_blocks_identities():
    torch.manual_seed(0)
    model = build_model(cfg(zero_init_head=True, zero_init_proj=True))
    assert model(tokens(), tokens(1)).item() == pytest.approx(math.log(VOCAB), abs=1e-6)
    x = torch.randn(2, 8, 32)
    for block in model.blocks:
        torch.testing.assert_close(block(x, model._rope(torch.arange(8)), None), x)
    # the other weights are the plain build's, draw for draw
    torch.manual_seed(0)
    plain = build_model(cfg())
    same = {n for n, p in plain.state_dict().items() if torch.equal(p, model.state_dict()[n])}
    assert same == {
        n for n in plain.state_dict() if not n.endswith(("proj.weight", "down.weight", "lm_head.weight"))
    }


def test_z_loss_is_added_in_training_only():
    torch.manual_seed(0)
    model = build_model(cfg(z_loss=1e-2))
    x, targets = tokens(), tokens(1)
    with torch.no_grad():
        logits = model(x)[..., :VOCAB].reshape(-1, VOCAB)
        ce = F.cross_entropy(logits, targets.reshape(-1))
        z = torch.logsumexp(logits, dim=-1).square().mean()
        model.train()
        torch.testing.assert_close(model(x, targets), ce + 1e-2 * z)
        model.eval()
        torch.testing.assert_close(model(x, targets), ce)


def test_the_chunked_loss_has_the_plain_gradients_with_softcap_and_z_loss():
    torch.manual_seed(0)
    model = build_model(cfg(logit_softcap=3.0, z_loss=1e-2, tie_embeddings=False)).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits well into the tanh's bend
    x, targets = tokens(), tokens(1)
    targets[0, :3] = -100  # ignored targets take no part
    model(x, targets).backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x)[..., :VOCAB].reshape(-1, VOCAB)  # soft-capped, materialized
    flat = targets.reshape(-1)
    scored = flat != -100
    lse = torch.logsumexp(logits, dim=-1)
    plain = F.cross_entropy(logits, flat) + 1e-2 * (lse.square() * scored).sum() / scored.sum()
    plain.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(activation="tanh"), "model.activation"),
        (dict(logit_softcap=0.0), "model.logit_softcap"),
        (dict(z_loss=-1.0), "model.z_loss"),
        (dict(zero_init_head=True, tie_embeddings=True), "model.zero_init_head"),
        (dict(kernels=["swiglu"], activation="relu2"), "model.kernels"),
    ],
)
def test_bad_option_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_model_config(cfg(**overrides))


def test_relu2_and_rms_norm_backwards_are_the_derivatives():
    """Both are autograd Functions with their backward written out: gradcheck them in float64."""
    from llmtrain.model.transformer import ReLUSquared, RMSNormFunction

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReLUSquared.apply, (x,))
    assert torch.autograd.gradcheck(lambda a, w: RMSNormFunction.apply(a, w, 1e-5), (x, weight))
    # and the value is the formula's
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(RMSNormFunction.apply(x, weight, 1e-5), x / rms * weight)


def test_rms_norm_past_fp32_range_is_nan_not_a_quiet_zero():
    """x^2 overflowing fp32 would make 1/rms 0: the output must be non-finite for the guard to see."""
    from llmtrain.model.transformer import RMSNormFunction

    x = torch.full((2, 8), 1e30)
    assert torch.isnan(RMSNormFunction.apply(x, torch.ones(8), 1e-5)).all()
    assert torch.isfinite(RMSNormFunction.apply(x / 1e12, torch.ones(8), 1e-5)).all()
