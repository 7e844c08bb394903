"""Parameter counts, PaLM FLOPs per token, peak table and MFU."""

from __future__ import annotations

import pytest
import torch

from llmtrain.errors import ConfigError
from llmtrain.model import ModelConfig, build_model
from llmtrain.model.flops import flops_per_token, mfu, param_counts, peak_flops


def gpt2_small() -> ModelConfig:
    return ModelConfig(
        arch="gpt2",
        n_layers=12,
        d_model=768,
        n_heads=12,
        max_seq_len=1024,
        vocab_size=50257,
        tie_embeddings=True,
    )


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(arch="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=100),
        ModelConfig(arch="llama", n_layers=3, d_model=48, n_heads=6, n_kv_heads=1, vocab_size=77, bias=True),
        ModelConfig(arch="gpt2", n_layers=2, d_model=64, n_heads=4, vocab_size=100, tie_embeddings=True),
        ModelConfig(
            arch="gpt2", n_layers=2, d_model=64, n_heads=4, vocab_size=130, bias=False, ffn_hidden=100
        ),
    ],
    ids=["llama-gqa", "llama-mqa-bias", "gpt2-tied", "gpt2-untied-nobias"],
)
def test_analytic_counts_equal_the_built_model(cfg):
    model = build_model(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == model.num_params()
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    assert counts["total"] - counts["non_embedding"] == counts["embedding"]


def test_gpt2_small_counts_match_nanogpt():
    counts = param_counts(gpt2_small())
    assert counts["total"] == 124_439_808
    assert counts["non_embedding"] == 124_439_808 - 1024 * 768  # only the learned positions drop out


def test_flops_per_token_is_palm_formula():
    cfg = gpt2_small()
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    llama = ModelConfig(
        n_layers=32, d_model=4096, n_heads=32, ffn_hidden=11008, max_seq_len=4096, vocab_size=32000
    )
    n7b = 6_738_415_616 - 32000 * 4096  # the input table is free; the untied head is a matmul
    assert flops_per_token(llama, 4096) == 6 * n7b + 12 * 32 * 4096 * 4096


def test_peak_table_and_env_override(monkeypatch):
    monkeypatch.delenv("LLMTRAIN_PEAK_FLOPS", raising=False)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Some CPU") is None
    if not torch.cuda.is_available():
        assert peak_flops() is None
    monkeypatch.setenv("LLMTRAIN_PEAK_FLOPS", "123e12")
    assert peak_flops("NVIDIA H100 80GB HBM3") == 123e12
    monkeypatch.setenv("LLMTRAIN_PEAK_FLOPS", "fast")
    with pytest.raises(ConfigError, match="LLMTRAIN_PEAK_FLOPS"):
        peak_flops()


def test_mfu():
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(1000.0, 1e9, None) is None


def test_mfu_is_only_reported_against_a_peak_for_the_runs_precision(monkeypatch):
    """The table holds dense bf16/fp16 tensor-core peaks; an fp32 run has no peak to divide by."""
    monkeypatch.delenv("LLMTRAIN_PEAK_FLOPS", raising=False)
    assert peak_flops("NVIDIA H100 80GB HBM3", precision="fp16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", precision="fp32") is None
    assert mfu(1e5, 1e9, peak_flops("NVIDIA H100 80GB HBM3", precision="fp32")) is None
    monkeypatch.setenv("LLMTRAIN_PEAK_FLOPS", "67e12")  # the user names the peak: used as given
    assert peak_flops("NVIDIA H100 80GB HBM3", precision="fp32") == 67e12
