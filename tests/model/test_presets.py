"""Every model preset composes through the real config tree; published ones have published sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmtrain.config import CONFIG_DIR, load_config
from llmtrain.model import Transformer, check_model_config
from llmtrain.model.flops import param_counts

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))

# (vocabulary of the published tokenizer, published parameter count)
PUBLISHED = {
    "gpt2_124m": (50257, 124_439_808),
    "llama2_7b": (32000, 6_738_415_616),
    "llama3_8b": (128256, 8_030_261_248),
    "llama_1b": (128256, 1_235_814_400),  # Llama-3.2-1B
}
# Presets of our own: (vocabulary, the rough size their comment promises).
APPROX = {
    "tiny": (8192, 0.5e6, 2e6),
    "mini": (8192, 1.9e6, 2.3e6),
    "llama_125m": (32000, 100e6, 130e6),
    "llama_350m": (32000, 320e6, 370e6),
}


def test_all_issue_presets_exist():
    expected = {"tiny", "gpt2_124m", "llama_125m", "llama_350m", "llama_1b", "llama2_7b", "llama3_8b"}
    assert expected <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_has_its_size(name):
    cfg = load_config([f"model={name}", "train.seq_len=128"]).model
    assert cfg.vocab_size is None  # the tokenizer supplies it
    check_model_config(cfg, need_vocab=False)
    vocab, published = PUBLISHED[name] if name in PUBLISHED else (APPROX[name][0], None)
    cfg.vocab_size = vocab
    with torch.device("meta"):  # counts without allocating 8B parameters
        model = Transformer(cfg)
    assert model.num_params() == param_counts(cfg)["total"]
    if published is not None:
        assert model.num_params() == published
    else:
        _, low, high = APPROX[name]
        assert low <= model.num_params() <= high
