"""The decoder-only Transformer, built from a ModelConfig.

The Transformer (and so torch) is imported on first use: `llmtrain.config` imports this package
for `ModelConfig`, and `llmtrain prepare` or `llmtrain --help` should not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtrain.model.config import ModelConfig, check_model_config

if TYPE_CHECKING:
    from llmtrain.model.transformer import KVCache, Transformer


def build_model(cfg: ModelConfig) -> Transformer:
    """A freshly initialized Transformer; ConfigError naming the key if cfg cannot build one.

    With cfg.compile each block is compiled in place (`Module.compile`), so parameter names and
    checkpoints stay the same as the eager model's (no `_orig_mod.` prefix).
    """
    from llmtrain.model.transformer import Transformer

    model = Transformer(cfg)
    if cfg.compile:
        for block in model.blocks:
            block.compile()
    return model


def __getattr__(name: str):
    if name in ("KVCache", "Transformer"):
        from llmtrain.model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KVCache", "ModelConfig", "Transformer", "build_model", "check_model_config"]
