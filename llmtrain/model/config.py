"""Typed configuration of the decoder-only Transformer, and the shape checks run at build time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmtrain.errors import ConfigError

KERNEL_NAMES = ("rmsnorm", "swiglu", "fused_ce")
ACTIVATIONS = ("swiglu", "gelu", "relu2")


@dataclass
class ModelConfig:
    """One implementation, two families: `arch: llama` and `arch: gpt2`."""

    arch: str = "llama"
    """llama (RMSNorm, SwiGLU, rotary, no biases) | gpt2 (LayerNorm, GELU, learned positions, biases)."""
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None = n_heads (1 = multi-query)."""
    ffn_hidden: int | None = None
    """MLP width; None = 4*d_model (gelu, relu2) or the Llama rule 2/3*4*d_model rounded up to 256 (swiglu)."""
    activation: str | None = None
    """MLP: swiglu (gated SiLU; Shazeer 2020) | gelu (tanh GELU, GPT-2) | relu2 (squared ReLU, not gated;
    So et al. 2021 "Primer", the modded-nanogpt speedruns). None = the family's (llama: swiglu, gpt2: gelu)."""
    qk_norm: bool = False
    """RMSNorm (with a gain) on each head's queries and keys before the dot product, bounding the
    attention logits (Dehghani et al. 2023, ViT-22B; OLMo 2; Qwen3)."""
    logit_softcap: float | None = None
    """Output logits become c * tanh(logits / c) (Gemma 2, 2024; modded-nanogpt uses 15-30): no logit
    can run away. None = off."""
    zero_init_head: bool = False
    """Start the (untied) output head at zero, so the first predictions are uniform (modded-nanogpt)."""
    zero_init_proj: bool = False
    """Start each block's residual projections (attention out, MLP down) at zero: every block begins as
    the identity (modded-nanogpt; Bachlechner et al. 2020, ReZero)."""
    z_loss: float = 0.0
    """Training adds z_loss * mean(logsumexp(logits)^2), pulling the softmax normalizer toward 1 (PaLM,
    Chowdhery et al. 2022: 1e-4). Validation reports the cross-entropy alone."""
    max_seq_len: int = 256
    vocab_size: int | None = None
    """Taken from the tokenizer when None."""
    vocab_multiple: int = 64
    """The embedding table is padded to a multiple of this for speed."""
    tie_embeddings: bool = False
    dropout: float = 0.0
    bias: bool | None = None
    """None = the family's default (gpt2: True, llama: False)."""
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    doc_mask: bool = False
    """Attend only within each packed document (block-diagonal causal mask; positions restart)."""
    activation_checkpointing: bool = False
    compile: bool = False
    """torch.compile: in training the whole model through DeepSpeed (`engine.compile()`, after ZeRO's
    hooks are in place); elsewhere (eval, generate) each block in place."""
    kernels: list[str] = field(default_factory=list)
    """Fused Triton kernels to use where available: rmsnorm, swiglu, fused_ce."""

    # Derived shapes: one place that resolves the `None = family default` fields.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_activation(self) -> str:
        if self.activation is not None:
            return self.activation
        return "gelu" if self.arch == "gpt2" else "swiglu"

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp_activation != "swiglu":
            return 4 * self.d_model
        return 256 * math.ceil(int(2 * 4 * self.d_model / 3) / 256)

    @property
    def use_bias(self) -> bool:
        return self.bias if self.bias is not None else self.arch == "gpt2"

    @property
    def padded_vocab(self) -> int:
        if self.vocab_size is None:
            raise ValueError("vocab_size is not set")
        return self.vocab_multiple * math.ceil(self.vocab_size / self.vocab_multiple)


def check_model_config(cfg: ModelConfig, *, need_vocab: bool = True) -> None:
    """Raise ConfigError naming the `model.*` key whose value cannot build a model.

    `need_vocab=False` is for compose time, before the tokenizer has supplied the vocabulary.
    """

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"model.{key}: {message}")

    check(cfg.arch in ("llama", "gpt2"), "arch", f"must be llama or gpt2, got {cfg.arch!r}")
    for key in ("n_layers", "d_model", "n_heads", "max_seq_len", "vocab_multiple"):
        value = getattr(cfg, key)
        check(isinstance(value, int) and value >= 1, key, f"must be a positive integer, got {value!r}")
    check(
        cfg.d_model % cfg.n_heads == 0,
        "n_heads",
        f"{cfg.n_heads} heads do not divide model.d_model={cfg.d_model}",
    )
    kv = cfg.kv_heads
    check(
        kv >= 1 and cfg.n_heads % kv == 0,
        "n_kv_heads",
        f"{kv} key/value heads must be at least 1 and divide model.n_heads={cfg.n_heads}",
    )
    if cfg.arch == "llama":
        check(
            cfg.head_dim % 2 == 0,
            "n_heads",
            f"rotary embeddings need an even head dim, got model.d_model/model.n_heads = "
            f"{cfg.d_model}/{cfg.n_heads} = {cfg.head_dim}",
        )
    check(
        cfg.ffn_hidden is None or cfg.ffn_hidden >= 1, "ffn_hidden", f"must be positive, got {cfg.ffn_hidden}"
    )
    if cfg.vocab_size is None:
        check(
            not need_vocab,
            "vocab_size",
            "is not set: it comes from the tokenizer (run `llmtrain prepare` first) or set model.vocab_size",
        )
    else:
        check(cfg.vocab_size >= 1, "vocab_size", f"must be positive, got {cfg.vocab_size}")
    check(0.0 <= cfg.dropout < 1.0, "dropout", f"must be in [0, 1), got {cfg.dropout}")
    check(cfg.norm_eps > 0, "norm_eps", f"must be positive, got {cfg.norm_eps}")
    check(cfg.rope_theta > 0, "rope_theta", f"must be positive, got {cfg.rope_theta}")
    check(cfg.init_std > 0, "init_std", f"must be positive, got {cfg.init_std}")
    check(
        cfg.activation is None or cfg.activation in ACTIVATIONS,
        "activation",
        f"unknown activation {cfg.activation!r}; choose from {', '.join(ACTIVATIONS)}",
    )
    cap = cfg.logit_softcap
    check(cap is None or cap > 0, "logit_softcap", f"must be positive (or null for off), got {cap}")
    check(cfg.z_loss >= 0, "z_loss", f"must not be negative, got {cfg.z_loss}")
    check(
        not (cfg.zero_init_head and cfg.tie_embeddings),
        "zero_init_head",
        "needs model.tie_embeddings=false (a tied head is the token embedding: zero would erase the inputs)",
    )
    for name in cfg.kernels:
        check(
            name in KERNEL_NAMES, "kernels", f"unknown kernel {name!r}; choose from {', '.join(KERNEL_NAMES)}"
        )
        if name in ("rmsnorm", "swiglu"):
            check(cfg.arch == "llama", "kernels", f"{name} applies to arch=llama only (arch is {cfg.arch})")
        if name == "swiglu":
            check(
                cfg.mlp_activation == "swiglu",
                "kernels",
                f"swiglu needs model.activation=swiglu (it is {cfg.mlp_activation})",
            )
