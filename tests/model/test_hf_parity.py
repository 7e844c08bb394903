"""Our model and Hugging Face transformers compute the same function (random weights, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from llmtrain.errors import ConfigError
from llmtrain.model import ModelConfig, build_model
from llmtrain.model.hf import from_hf, to_hf

transformers = pytest.importorskip("transformers")

VOCAB = 100  # ours pads to 128, HF keeps 100


def llama_cfg(**overrides) -> ModelConfig:
    base = dict(
        arch="llama", n_layers=2, d_model=64, n_heads=8, n_kv_heads=2, ffn_hidden=96, max_seq_len=64,
        vocab_size=VOCAB, rope_theta=5000.0, norm_eps=1e-6,
    )  # fmt: skip
    return ModelConfig(**{**base, **overrides})


def gpt2_cfg(**overrides) -> ModelConfig:
    base = dict(
        arch="gpt2", n_layers=2, d_model=64, n_heads=4, max_seq_len=64, vocab_size=VOCAB, tie_embeddings=True
    )
    return ModelConfig(**{**base, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms and biases included, so no mapping hides behind ones or zeros."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1.0 + 0.1 * noise if "norm" in name or "ln" in name else 0.05 * noise)


def hf_model(cfg_dict: dict):
    config_cls = transformers.LlamaConfig if cfg_dict["model_type"] == "llama" else transformers.GPT2Config
    config = config_cls(**{k: v for k, v in cfg_dict.items() if k != "model_type"})
    model_cls = (
        transformers.LlamaForCausalLM if cfg_dict["model_type"] == "llama" else transformers.GPT2LMHeadModel
    )
    return model_cls(config).eval()


def load_hf(model, sd: dict[str, torch.Tensor], tied: bool) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if tied else [])  # a tied head is the embedding


CASES = [
    pytest.param(llama_cfg(), id="llama-gqa-untied"),
    pytest.param(llama_cfg(n_kv_heads=1, tie_embeddings=True), id="llama-mqa-tied"),
    pytest.param(llama_cfg(bias=True, n_kv_heads=8), id="llama-bias"),
    pytest.param(gpt2_cfg(), id="gpt2-tied"),
    pytest.param(gpt2_cfg(tie_embeddings=False), id="gpt2-untied"),
    pytest.param(gpt2_cfg(activation="relu2", tie_embeddings=False), id="gpt2-relu2"),
]


@pytest.mark.parametrize("cfg", CASES)
def test_ours_to_hf_gives_the_same_logits(cfg):
    ours = build_model(cfg).eval()
    randomize(ours, seed=1)
    sd, cfg_dict = to_hf(ours.state_dict(), cfg)
    theirs = hf_model(cfg_dict)
    load_hf(theirs, sd, cfg.tie_embeddings)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(x).logits
        got = ours(x)[..., :VOCAB]
    assert expected.shape == got.shape == (2, 24, VOCAB)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", CASES)
def test_hf_to_ours_gives_the_same_logits_and_round_trips_exactly(cfg):
    _, cfg_dict = to_hf(build_model(cfg).state_dict(), cfg)
    theirs = hf_model(cfg_dict)
    randomize(theirs, seed=2)
    hf_sd = theirs.state_dict()
    sd, ours_cfg = from_hf(hf_sd, theirs.config.to_dict())
    for key in (
        "arch",
        "n_layers",
        "d_model",
        "n_heads",
        "kv_heads",
        "ffn_dim",
        "tie_embeddings",
        "use_bias",
    ):
        assert getattr(ours_cfg, key) == getattr(cfg, key), key
    ours = build_model(ours_cfg).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[..., :VOCAB], theirs(x).logits, rtol=1e-5, atol=1e-5)
    back, _ = to_hf(sd, ours_cfg)
    for name, t in back.items():
        assert torch.equal(t, hf_sd[name]), name


def test_hf_loss_equals_ours():
    cfg = llama_cfg()
    ours = build_model(cfg).eval()
    randomize(ours, seed=4)
    sd, cfg_dict = to_hf(ours.state_dict(), cfg)
    theirs = hf_model(cfg_dict)
    load_hf(theirs, sd, tied=False)
    x = torch.randint(0, VOCAB, (2, 16))
    labels = x.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        hf_loss = theirs(x, labels=labels).loss  # HF shifts labels inside
        our_loss = ours(x[:, :-1], labels[:, 1:])
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-5, atol=1e-6)


def test_gpt2_without_biases_exports_zero_biases():
    cfg = gpt2_cfg(bias=False)
    ours = build_model(cfg).eval()
    randomize(ours, seed=5)
    sd, cfg_dict = to_hf(ours.state_dict(), cfg)
    assert torch.count_nonzero(sd["transformer.h.0.attn.c_attn.bias"]) == 0
    theirs = hf_model(cfg_dict)
    load_hf(theirs, sd, tied=True)
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[..., :VOCAB], theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers_loads():
    cfg = gpt2_cfg()
    ours = build_model(cfg).eval()
    randomize(ours, seed=6)
    sd, cfg_dict = to_hf(ours.state_dict(), cfg)
    hub = {name.removeprefix("transformer."): t for name, t in sd.items()}  # as in the Hub's gpt2 files
    hub["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()  # an old causal-mask buffer: ignored
    back, back_cfg = from_hf(hub, cfg_dict)
    reloaded = build_model(back_cfg).eval()
    reloaded.load_state_dict(back, strict=True)
    x = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(x)[..., :VOCAB], ours(x)[..., :VOCAB])


def test_unsupported_conversions_name_the_key():
    cfg = gpt2_cfg(n_kv_heads=2)
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads"):
        to_hf(build_model(cfg).state_dict(), cfg)
    _, cfg_dict = to_hf(build_model(llama_cfg()).state_dict(), llama_cfg())
    scaled = {**cfg_dict, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    with pytest.raises(ConfigError, match="rope_type"):
        from_hf({}, scaled)


@pytest.mark.parametrize(
    "cfg, key",
    [
        (llama_cfg(qk_norm=True), "model.qk_norm"),
        (gpt2_cfg(logit_softcap=30.0), "model.logit_softcap"),
        (llama_cfg(activation="relu2"), "model.activation"),
        (gpt2_cfg(activation="swiglu"), "model.activation"),
    ],
)
def test_options_transformers_cannot_represent_are_refused_by_name(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_hf(build_model(cfg).state_dict(), cfg)


def test_training_only_options_export_unchanged():
    cfg = llama_cfg(z_loss=1e-4, zero_init_proj=True)
    plain = llama_cfg()
    ours = build_model(cfg)
    randomize(ours, seed=3)
    assert to_hf(ours.state_dict(), cfg)[1] == to_hf(ours.state_dict(), plain)[1]
