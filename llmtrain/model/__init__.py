"""The decoder-only Transformer, built from a ModelConfig."""

from __future__ import annotations

from llmtrain.model.config import ModelConfig, check_model_config
from llmtrain.model.transformer import KVCache, Transformer


def build_model(cfg: ModelConfig) -> Transformer:
    """A freshly initialized Transformer; ConfigError naming the key if cfg cannot build one.

    With cfg.compile each block is compiled in place (`Module.compile`), so parameter names and
    checkpoints stay the same as the eager model's (no `_orig_mod.` prefix).
    """
    model = Transformer(cfg)
    if cfg.compile:
        for block in model.blocks:
            block.compile()
    return model


__all__ = ["KVCache", "ModelConfig", "Transformer", "build_model", "check_model_config"]
