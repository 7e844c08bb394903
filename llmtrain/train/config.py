"""Typed configuration of a training run: run identity, loop, optimizer, schedule, DeepSpeed,
checkpoints and logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunConfig:
    name: str = "default"
    dir: str | None = None
    """Run directory; defaults to `runs/<name>`. Never derived from the clock."""
    seed: int = 1234


@dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    global_batch_size: int | None = None
    """Sequences per optimizer step; None = micro_batch_size x data-parallel world (no accumulation)."""
    seq_len: int = 1024
    precision: str = "bf16"
    """bf16 | fp16 | fp32."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    val_every: int = 200
    """Validate every N steps (and at the end); 0 disables."""
    val_batches: int | None = 20
    """Micro-batches per validation pass; None = the whole validation split."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    decay_norms_and_biases: bool = False
    decay_embeddings: bool = False


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """cosine (linear warmup + cosine to a floor) | wsd (warmup-stable-decay) | constant."""
    warmup_steps: int = 100
    total_steps: int | None = None
    """Horizon of the schedule; None = train.max_steps. Past the horizon the lr stays at its floor."""
    min_lr_ratio: float = 0.1
    """Floor as a fraction of optim.lr."""
    decay_fraction: float = 0.2
    """wsd only: share of total_steps spent in the final decay."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    loss_scale_window: int = 1000
    initial_scale_power: int = 16
    config: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config merged over the generated one, for anything not covered above."""


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every N steps; 0 disables."""
    every_minutes: float | None = None
    """Also save when this many minutes passed since the last save."""
    keep_last: int = 3
    at_end: bool = True


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """online | offline | disabled."""
    project: str = "llmtrain"
    entity: str | None = None
    name: str | None = None
    """Display name; None = run.name."""
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    every_steps: int = 10
    progress: bool = True
    """tqdm bar with ETA on a terminal; when false, or without a terminal, one plain line per logged step."""
    tensorboard: bool = False
    plot: bool = True
    """Write loss_curve.png into the run directory at the end."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
