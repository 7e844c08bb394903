"""The configuration schema and how it is composed.

Merge order: dataclass defaults (this schema) <- YAML groups in `configs/` (and a user's
`--config-dir`) <- command-line overrides, ending in one typed `Config` object. A misspelled key
or a wrong type fails at compose time with the key's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.data.config import DataConfig, PrepareConfig, TokenizerConfig
from llmtrain.errors import UserError
from llmtrain.model.config import ModelConfig, check_model_config
from llmtrain.train.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SCHEMA_NAME = "llmtrain_schema"


class ConfigError(UserError):
    """A configuration value is missing, malformed, or inconsistent with another."""


@dataclass
class GenerateConfig:
    prompt: str = "def "
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 50
    num_samples: int = 1
    checkpoint: str | None = None
    """A checkpoint folder; None = the run's latest complete checkpoint."""


@dataclass
class EvalConfig:
    checkpoint: str | None = None
    """A checkpoint folder; None = the run's latest complete checkpoint."""
    micro_batch_size: int = 8
    max_batches: int | None = None
    """Micro-batches per source; None = the whole validation split."""


@dataclass
class ExportConfig:
    out: str | None = None
    """Output folder; None = `<run_dir>/hf`."""
    checkpoint: str | None = None


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    resume: str = "auto"
    """auto (newest complete checkpoint, else fresh) | none | a checkpoint folder."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or os.path.join("runs", self.run.name))

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir or os.path.join("data", self.data.name or "default"))


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def load_config(
    overrides: list[str] | tuple[str, ...] = (),
    config_dir: str | os.PathLike | None = None,
    config_name: str = "config",
) -> Config:
    """Compose `configs/config.yaml` with a user's `--config-dir` and overrides into a `Config`.

    Uses Hydra's compose API rather than `@hydra.main`: no output folder, no chdir, no clash with
    the `--local_rank` argument of the deepspeed launcher, and the same result on every rank.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register_schema()
    overrides = list(overrides)
    if config_dir is not None:
        user_dir = Path(config_dir).expanduser().resolve()
        if not user_dir.is_dir():
            raise ConfigError(f"--config-dir {config_dir}: no such folder")
        overrides.append(f"hydra.searchpath=[file://{user_dir}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            raw = compose(config_name, overrides=overrides, return_hydra_config=True)
        choices = OmegaConf.to_container(raw.hydra.runtime.choices)
        with _unlocked(raw):
            del raw["hydra"]
        cfg: Config = OmegaConf.to_object(raw)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        # Hydra raises ValueError for some malformed overrides, e.g. `debug=null` on a group
        raise ConfigError(_one_line(err)) from None
    finally:
        GlobalHydra.instance().clear()
    if cfg.data.name is None:
        cfg.data.name = choices.get("data") or "default"
    validate(cfg)
    return cfg


def _unlocked(node):
    from omegaconf import open_dict

    return open_dict(node)


def _one_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return " | ".join(lines[:3]) if lines else type(err).__name__


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Checks that need no world size: enumerations, ranges, and field-to-field consistency."""
    _check(
        cfg.model.arch in ("llama", "gpt2"), "model.arch", f"must be llama or gpt2, got {cfg.model.arch!r}"
    )
    _check(
        cfg.tokenizer.model_type in ("bpe", "unigram"),
        "tokenizer.model_type",
        f"must be bpe or unigram, got {cfg.tokenizer.model_type!r}",
    )
    _check(
        cfg.data.on_bad_record in ("fail", "skip"),
        "data.on_bad_record",
        f"must be fail or skip, got {cfg.data.on_bad_record!r}",
    )
    _check(
        cfg.train.precision in ("bf16", "fp16", "fp32"),
        "train.precision",
        f"must be bf16, fp16 or fp32, got {cfg.train.precision!r}",
    )
    _check(
        cfg.schedule.name in ("cosine", "wsd", "constant"),
        "schedule.name",
        f"must be cosine, wsd or constant, got {cfg.schedule.name!r}",
    )
    _check(
        cfg.deepspeed.zero_stage in (0, 1, 2, 3),
        "deepspeed.zero_stage",
        f"must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}",
    )
    _check(
        cfg.logging.wandb.mode in ("online", "offline", "disabled"),
        "logging.wandb.mode",
        f"must be online, offline or disabled, got {cfg.logging.wandb.mode!r}",
    )
    _check(cfg.train.max_steps > 0, "train.max_steps", "must be positive")
    _check(cfg.train.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
    _check(cfg.train.seq_len > 0, "train.seq_len", "must be positive")
    _check(
        cfg.train.seq_len <= cfg.model.max_seq_len,
        "train.seq_len",
        f"{cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}",
    )
    _check(cfg.optim.lr > 0, "optim.lr", "must be positive")
    _check(
        cfg.optim.name.lower() == "adamw", "optim.name", f"only adamw is supported, got {cfg.optim.name!r}"
    )
    for key in ("min_lr_ratio", "decay_fraction"):
        value = getattr(cfg.schedule, key)
        _check(0.0 <= value <= 1.0, f"schedule.{key}", f"must be in [0, 1], got {value}")
    _check(0 <= cfg.data.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
    _check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must not be negative (0 disables)")
    _check(cfg.logging.every_steps >= 1, "logging.every_steps", "must be at least 1")
    _check(cfg.train.val_every >= 0, "train.val_every", "must not be negative (0 disables)")
    total = cfg.schedule.total_steps
    _check(total is None or total > 0, "schedule.total_steps", "must be positive")
    _check(cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps", "must not be negative")
    if cfg.deepspeed.offload_params:
        _check(cfg.deepspeed.zero_stage == 3, "deepspeed.offload_params", "needs deepspeed.zero_stage=3")
    if cfg.deepspeed.offload_optimizer:
        _check(cfg.deepspeed.zero_stage >= 1, "deepspeed.offload_optimizer", "needs deepspeed.zero_stage>=1")
    check_model_config(cfg.model, need_vocab=False)
    names = [s.name for s in cfg.data.sources]
    _check(len(names) == len(set(names)), "data.sources", f"source names must be unique, got {names}")
    for i, src in enumerate(cfg.data.sources):
        _check(src.weight > 0, f"data.sources[{i}].weight", f"must be positive, got {src.weight}")
        _check(
            src.format in ("txt", "jsonl", "parquet", "stdlib"),
            f"data.sources[{i}].format",
            f"must be txt, jsonl, parquet or stdlib, got {src.format!r}",
        )


def batch_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """(global_batch_size, grad_accum_steps) for a data-parallel world; checks they are consistent."""
    micro = cfg.train.micro_batch_size
    per_step = micro * world_size
    glob = cfg.train.global_batch_size or per_step
    if glob % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size={glob} is not a multiple of train.micro_batch_size={micro} "
            f"x data-parallel world {world_size} = {per_step}"
        )
    return glob, glob // per_step


def config_from_yaml(path: str | os.PathLike) -> Config:
    """The typed `Config` saved beside a checkpoint (resolved YAML), checked against the schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: {_one_line(err)}") from None
