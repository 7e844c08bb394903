"""AdamW parameter groups: which tensors are decayed, tied weights counted once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.train.config import OptimConfig, check_optim_config
from llmtrain.train.optim import adamw, classify_parameters, param_groups


class MyRMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 8, tied: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(16, dim)
        self.ln = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)  # weight + bias
        self.norm = MyRMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.norm(self.proj(self.ln(x))))


def names_of(model, group):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return sorted(by_id[id(p)] for p in group["params"])


def test_default_decays_matrices_only_and_counts_tied_weight_once():
    model = TinyLM()
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert names_of(model, groups[0]) == ["proj.weight"]
    assert names_of(model, groups[1]) == [
        "ln.bias",
        "ln.weight",
        "norm.weight",
        "pos.weight",
        "proj.bias",
        "tok.weight",
    ]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable  # every trainable tensor exactly once; the frozen layer is left out


def test_tied_head_is_an_embedding_even_when_named_first():
    model = TinyLM()
    kinds = classify_parameters(model)
    assert kinds["tok.weight"] == "embedding" and "head.weight" not in kinds
    assert kinds["norm.weight"] == "norm" and kinds["proj.bias"] == "bias"


def test_untied_head_is_decayed():
    model = TinyLM(tied=False)
    groups = param_groups(model, OptimConfig())
    assert names_of(model, groups[0]) == ["head.weight", "proj.weight"]


def test_switches_move_norms_biases_and_embeddings_into_decay():
    model = TinyLM()
    groups = param_groups(model, OptimConfig(decay_norms_and_biases=True))
    assert names_of(model, groups[0]) == ["ln.bias", "ln.weight", "norm.weight", "proj.bias", "proj.weight"]
    groups = param_groups(model, OptimConfig(decay_embeddings=True))
    assert names_of(model, groups[0]) == ["pos.weight", "proj.weight", "tok.weight"]
    groups = param_groups(model, OptimConfig(decay_embeddings=True, decay_norms_and_biases=True))
    assert len(groups) == 1 and groups[0]["name"] == "decay"


def test_build_optimizer_applies_decay_only_to_decay_group():
    torch.manual_seed(0)
    model = TinyLM()
    cfg = OptimConfig(weight_decay=0.5, beta1=0.8, beta2=0.9, eps=1e-6)
    opt = adamw(param_groups(model, cfg), cfg, lr=0.1)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-6
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # zero gradients: AdamW then moves only decayed weights, by exactly lr * wd * w
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["proj.weight"], before["proj.weight"] * (1 - 0.1 * 0.5))
    for name in ("tok.weight", "ln.weight", "proj.bias", "norm.weight"):
        assert torch.equal(after[name], before[name]), name


def test_fused_and_foreach_agree():
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = TinyLM()
        opt = adamw(param_groups(model, OptimConfig()), OptimConfig(), lr=1e-2, fused=fused)
        for _ in range(3):
            loss = model(torch.randint(0, 11, (2, 5))).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_names_the_key():
    with pytest.raises(ConfigError, match="optim.name"):
        check_optim_config(OptimConfig(name="lion"))


def muon_groups_of(**model_overrides):
    from llmtrain.model import build_model
    from llmtrain.model.config import ModelConfig

    model = build_model(ModelConfig(vocab_size=64, n_layers=1, d_model=32, n_heads=2, **model_overrides))
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.04, weight_decay=0.1, muon_weight_decay=0.01)
    return model, cfg, param_groups(model, cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_muon_takes_hidden_matrices_only_and_tags_every_parameter(tied):
    """The embedding is 2-D too, and DeepSpeed's own tagging (names without "embed") would give it to
    Muon; ours keeps it, the head, the norms and the biases with AdamW."""
    model, cfg, groups = muon_groups_of(tie_embeddings=tied, bias=True)
    by_name = {g["name"]: names_of(model, g) for g in groups}
    assert by_name["muon"] == sorted(
        f"blocks.0.{m}.weight" for m in ("attn.qkv", "attn.proj", "mlp.gate", "mlp.up", "mlp.down")
    )
    assert ("lm_head.weight" in by_name.get("adam_decay", [])) is not tied
    assert "tok_emb.weight" in by_name["adam_no_decay"]
    assert all(n.endswith("bias") or "norm" in n or "emb" in n for n in by_name["adam_no_decay"])
    muon, *adam = groups
    assert (muon["lr"], muon["weight_decay"], muon["momentum"]) == (0.04, 0.01, 0.95)
    assert all(g["lr"] == 1e-3 and g["use_muon"] is False for g in adam)
    for group in groups:
        assert all(p.use_muon is group["use_muon"] for p in group["params"])
    from llmtrain.train.optim import lr_scales

    assert lr_scales(groups, cfg) == pytest.approx([40.0] + [1.0] * len(adam))


def test_muon_optimizer_orthogonalizes_and_adam_half_steps():
    """DeepSpeed's MuonWithAuxAdam as the backend builds it, stepped directly (what ZeRO-0 does); its
    Newton-Schulz step eager (DeepSpeed torch.compiles it, seconds per shape on a CPU)."""
    from llmtrain.distributed.backend import _muon

    torch.manual_seed(0)
    model, cfg, groups = muon_groups_of()
    opt = _muon(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16)))
    loss.backward()
    with torch._dynamo.config.patch(disable=True):
        opt.step()
    up = (model.blocks[0].mlp.up.weight - before["blocks.0.mlp.up.weight"]).double()
    s = torch.linalg.svdvals(up / (1 - 0.04 * 0.01))  # minus the decay, about lr * sqrt(rows / cols)
    assert float(s.max() / s.min()) < 2.5
    changed = model.tok_emb.weight.detach() - before["tok_emb.weight"]
    assert changed.abs().max() == pytest.approx(1e-3, rel=0.05)  # Adam's first step: lr * sign(grad)


def test_muon_config_checks_name_the_key():
    for key, value in (("muon_lr", 0.0), ("muon_momentum", 1.0), ("muon_ns_method", "svd")):
        with pytest.raises(ConfigError, match=f"optim.{key}"):
            check_optim_config(OptimConfig(name="muon", **{key: value}))
