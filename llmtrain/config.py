"""The configuration schema and how it is composed.

Merge order: dataclass defaults (this schema) <- YAML groups in `configs/` (and a user's
`--config-dir`) <- command-line overrides, ending in one typed `Config` object. A misspelled key
or a wrong type fails at compose time with the key's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.data.config import (
    DataConfig,
    PrepareConfig,
    TokenizerConfig,
    check_data_config,
    check_prepare_config,
    check_tokenizer_config,
)
from llmtrain.errors import ConfigError, check
from llmtrain.model.config import ModelConfig, check_model_config
from llmtrain.train.config import (
    CheckpointConfig,
    DeepSpeedConfig,
    GuardConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    check_checkpoint_config,
    check_deepspeed_config,
    check_guard_config,
    check_logging_config,
    check_optim_config,
    check_schedule_config,
    check_train_config,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SCHEMA_NAME = "llmtrain_schema"


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
class PlanConfig:
    """`llmtrain plan`: memory per GPU of the configured model, ZeRO stage, batch and sequence length."""

    world_size: int = 8
    """GPUs the job shards over (ZeRO divides model states by it)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU, GB (10^9 bytes), that the plan must fit in."""
    json: bool = False
    """Print one JSON object instead of the table (also `llmtrain plan --json`)."""


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
    guard: GuardConfig = field(default_factory=GuardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    resume: str = "auto"
    """auto (newest checkpoint that verifies, else fresh) | none | a checkpoint folder."""
    resume_allow_data_change: bool = False
    """Resume although the shards (names, sizes, checksums, tokenizer) differ from the checkpoint's."""

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
        check_known_keys(OmegaConf.to_container(raw, resolve=False), Config)
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
    """Hydra's and OmegaConf's multi-line messages as one line, keeping the reason and any option list."""
    text = str(err)
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause) not in text:
        # "Error merging override train.micro_batch_size=abc" alone drops why.
        text = f"{text}: {cause}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("reference_type=", "object_type=", "full_key:"))]
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    if len(lines) > 1 and lines[1].startswith("Available options in"):
        return f"{lines[0]}; {lines[1].rstrip(':').lower()}: {', '.join(lines[2:])}"
    return " | ".join(lines[:3]) if lines else type(err).__name__


def _schema_keys(cls) -> dict[str, object]:
    """Field name -> type of a config dataclass (resolved, despite `from __future__ import annotations`)."""
    import typing

    return typing.get_type_hints(cls)


def check_known_keys(node: object, cls: type, prefix: str = "") -> None:
    """Every key of a composed config must be a field of the schema: Hydra lets `+train.max_stepz=5`
    add a key that the typed object then drops without a word."""
    import dataclasses
    import difflib
    import typing

    if not isinstance(node, dict):
        return
    fields = _schema_keys(cls)
    for key, value in node.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{name}: no such key in the config schema{hint}")
        kind = fields[key]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if dataclasses.is_dataclass(kind):
            check_known_keys(value, kind, f"{name}.")
        elif typing.get_origin(kind) is list and args and dataclasses.is_dataclass(args[0]):
            for i, item in enumerate(value or []):
                check_known_keys(item, args[0], f"{name}[{i}].")


def validate(cfg: Config) -> None:
    """Every value once, before any rank starts: each section's own check, then the cross-section ones."""
    check_model_config(cfg.model, need_vocab=False)
    check_data_config(cfg.data)
    check_tokenizer_config(cfg.tokenizer)
    check_prepare_config(cfg.prepare)
    check_train_config(cfg.train, max_seq_len=cfg.model.max_seq_len)
    check_optim_config(cfg.optim)
    check_schedule_config(cfg.schedule)
    check_deepspeed_config(cfg.deepspeed, precision=cfg.train.precision)
    check_checkpoint_config(cfg.checkpoint)
    check_guard_config(cfg.guard)
    check_logging_config(cfg.logging)
    check(bool(cfg.resume), "resume", "must be auto, none or a checkpoint folder")
    check(cfg.plan.world_size >= 1, "plan.world_size", f"must be >= 1 (got {cfg.plan.world_size})")
    check(cfg.plan.gpu_memory_gb > 0, "plan.gpu_memory_gb", f"must be > 0 (got {cfg.plan.gpu_memory_gb})")


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
