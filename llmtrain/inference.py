"""Loading a trained checkpoint as a plain PyTorch model, for eval, generate and export.

The model's shape comes from the config saved in the checkpoint, not from the command line, so
`llmtrain generate run.name=X` works without repeating the training overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmtrain.config import Config, config_from_yaml
from llmtrain.errors import CheckpointError


@dataclass
class Loaded:
    model: torch.nn.Module
    config: Config
    """The config the checkpoint was trained with."""
    checkpoint: Path
    state: dict
    """The checkpoint's llmtrain_state.json (step, tokenizer hash, ...)."""

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 consolidated weights of a complete checkpoint of any ZeRO stage, on the CPU.

    The caller has verified the checkpoint's manifest: the backend's consolidation unpickles files.
    """
    from llmtrain.distributed.backend import consolidated_state_dict
    from llmtrain.train.checkpoint import COMPLETE, is_complete

    if not is_complete(checkpoint):
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (no {COMPLETE} marker)")
    return consolidated_state_dict(Path(checkpoint))


def load_checkpoint_model(cfg: Config, which: str | None, device: torch.device | None = None) -> Loaded:
    """Build the model described by a checkpoint's saved config and load its fp32 weights.

    The checkpoint is verified against its manifest first (nothing is unpickled before that);
    one without a manifest needs `checkpoint.trust_unverified=true`.
    """
    from llmtrain.model import build_model
    from llmtrain.train.checkpoint import CONFIG_FILE, read_state, resolve_checkpoint

    path = resolve_checkpoint(cfg.run_dir, which, trust_unverified=cfg.checkpoint.trust_unverified)
    saved = config_from_yaml(path / CONFIG_FILE)
    state = read_state(path)
    if saved.model.vocab_size is None:
        raise CheckpointError(f"{path / CONFIG_FILE}: model.vocab_size is not recorded")
    saved.model.compile = False
    saved.model.activation_checkpointing = False
    model = build_model(saved.model)
    weights = load_weights(path)  # keeps DeepSpeed's narration off stdout, where results go
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the saved model config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device or default_device()).eval()
    return Loaded(model=model, config=saved, checkpoint=path, state=state)


def load_matching_tokenizer(loaded: Loaded):
    """The tokenizer of the checkpoint's data folder, refused if it is not the one trained with."""
    from llmtrain.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(loaded.config.data_dir)
    expected = (loaded.state.get("run") or {}).get("tokenizer_hash", loaded.state.get("tokenizer_hash"))
    if expected and tokenizer.hash != expected:
        raise CheckpointError(
            f"{loaded.config.data_dir}/tokenizer.model (hash {tokenizer.hash[:12]}) is not the tokenizer "
            f"{loaded.checkpoint} was trained with (hash {expected[:12]})"
        )
    return tokenizer
