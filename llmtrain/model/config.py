"""Typed configuration of the decoder-only Transformer."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """MLP width; None = 4*d_model (gpt2) or the Llama rule 2/3*4*d_model rounded up to 256."""
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
    kernels: list[str] = field(default_factory=list)
    """Fused Triton kernels to use where available: rmsnorm, swiglu, fused_ce."""
