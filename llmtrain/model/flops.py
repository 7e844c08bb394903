"""Parameter counts, FLOPs per token and model FLOPs utilization (MFU), from the config alone.

Convention (PaLM, appendix B): training FLOPs per token = 6*N + 12*L*H*Q*T, where N counts the
non-embedding parameters (the output projection included: it is a matmul even when tied), L
layers, H heads of dimension Q, and T the sequence length; attention's causal half is not
subtracted, so numbers compare with nanoGPT's and torchtitan's.
"""

from __future__ import annotations

import os

from llmtrain.errors import ConfigError
from llmtrain.model.config import ModelConfig

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per device, from the vendors' data sheets; fp16's
# dense peak is the same on these parts. fp32 has none here: it depends on whether matmuls use TF32.
# Matched in order against torch.cuda.get_device_name(): the first entry whose words all occur wins.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 989e12),
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (("A100",), 312e12),
]
PEAK_ENV = "LLMTRAIN_PEAK_FLOPS"
PEAK_PRECISIONS = ("bf16", "fp16")


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "non_embedding", "embedding"} as Transformer.num_params counts them (vocabulary
    padding rows excluded: they are never used). cfg.vocab_size must be set."""
    if cfg.vocab_size is None:
        raise ValueError("param_counts needs cfg.vocab_size")
    D, L, H, K, Q, F = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ffn_dim
    bias = cfg.use_bias
    attn = D * (H + 2 * K) * Q + H * Q * D + (((H + 2 * K) * Q + D) if bias else 0)
    if cfg.arch == "llama":
        mlp = 3 * D * F + ((2 * F + D) if bias else 0)
        norm = D
    else:
        mlp = 2 * D * F + ((F + D) if bias else 0)
        norm = 2 * D if bias else D
    token_emb = cfg.vocab_size * D
    pos_emb = cfg.max_seq_len * D if cfg.arch == "gpt2" else 0
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * D
    total = token_emb + pos_emb + L * (attn + mlp + 2 * norm) + norm + head
    # the input lookups are free; the output projection (tied or not) is a matmul, so it counts
    embedding = pos_emb + (0 if cfg.tie_embeddings else token_emb)
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: 6*N_nonemb + 12*L*H*Q*T."""
    n = param_counts(cfg)["non_embedding"]
    return float(6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len)


def peak_flops(device_name: str | None = None, *, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of one device at `precision`, or None when unknown (a CPU, an unlisted GPU,
    fp32), so MFU is only reported against a peak that applies to the run.

    $LLMTRAIN_PEAK_FLOPS (e.g. 989e12) overrides the table, for any precision. Without a name, the
    current CUDA device's is used.
    """
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ConfigError(f"{PEAK_ENV}={override!r}: must be a positive number of FLOP/s, e.g. 989e12")
        return value
    if precision not in PEAK_PRECISIONS:
        return None
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for words, peak in PEAK_BF16_FLOPS:
        if all(word.lower() in device_name.lower() for word in words):
            return peak
    return None


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved / peak FLOP/s as a fraction in [0, 1]; None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s_per_device * flops_per_token / peak
