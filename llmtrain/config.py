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
    """`llmtrain generate`: continue prompts with a checkpoint (docs/generation.md)."""

    prompt: str = "def "
    """The prompt; `-` reads one prompt (the whole of stdin). Ignored when prompt_file is set."""
    prompt_file: str | None = None
    """A file of prompts: one per line, or JSONL lines `{"prompt": "..."}`; blank lines are skipped."""
    max_new_tokens: int = 64
    """Tokens to add at most (fewer where the prompt leaves less room in model.max_seq_len)."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy."""
    top_k: int | None = 50
    """Sample among the k most likely tokens; 0 or null = all."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens holding this probability; 1 = all."""
    repetition_penalty: float = 1.0
    """Penalty (> 0) on tokens already in the prompt or the output (CTRL's); 1 = off."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: the text ends before the first one produced."""
    seed: int | None = None
    """Seed of the sampling; null = run.seed. Sample s of prompt p has its own stream: the output does not
    depend on batch_size."""
    num_samples: int = 1
    """Samples per prompt."""
    batch_size: int = 8
    """Rows (prompts x samples) decoded together."""
    stream: bool | None = None
    """Print tokens as they are produced; null = when there is one row (one prompt, one sample)."""
    use_cache: bool = True
    """Decode with the KV cache; false recomputes the whole prefix each step (same tokens, slower)."""
    checkpoint: str | None = None
    """A checkpoint or run folder, or a folder `llmtrain export` wrote; None = the run's latest complete
    checkpoint."""


@dataclass
class ChatConfig:
    """`llmtrain chat`: an interactive conversation with a fine-tuned checkpoint (docs/generation.md)."""

    checkpoint: str | None = None
    """A checkpoint or run folder, or a folder `llmtrain export` wrote; None = the run's latest complete
    checkpoint."""
    system: str | None = None
    """A system message that starts every conversation (kept when the history is trimmed)."""
    max_new_tokens: int = 256
    """Tokens per reply at most."""
    temperature: float = 0.7
    top_k: int | None = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None
    """Seed of the sampling; null = run.seed."""


def check_sampling_config(section, key: str) -> None:
    """The sampling values shared by `generate.*` and `chat.*`."""
    import math

    t = section.temperature
    check(math.isfinite(t) and t >= 0, f"{key}.temperature", f"must be >= 0 (0 = greedy), got {t}")
    k = section.top_k
    check(k is None or k >= 0, f"{key}.top_k", f"must be >= 0 (0 or null = all tokens), got {k}")
    p = section.top_p
    check(0 < p <= 1, f"{key}.top_p", f"must be in (0, 1] (1 = all tokens), got {p}")
    r = section.repetition_penalty
    check(math.isfinite(r) and r > 0, f"{key}.repetition_penalty", f"must be positive (1 = off), got {r}")
    n = section.max_new_tokens
    check(n >= 1, f"{key}.max_new_tokens", f"must be at least 1, got {n}")


def check_generate_config(g: GenerateConfig) -> None:
    check_sampling_config(g, "generate")
    check(g.num_samples >= 1, "generate.num_samples", f"must be at least 1, got {g.num_samples}")
    check(g.batch_size >= 1, "generate.batch_size", f"must be at least 1, got {g.batch_size}")
    for i, stop in enumerate(g.stop):
        check(bool(stop), f"generate.stop[{i}]", "must not be empty")


def check_chat_config(c: ChatConfig) -> None:
    check_sampling_config(c, "chat")
    check(c.system is None or bool(c.system.strip()), "chat.system", "must not be empty (null for none)")


@dataclass
class EvalConfig:
    checkpoint: str | None = None
    """A checkpoint folder; None = the run's latest complete checkpoint."""
    micro_batch_size: int = 8
    max_batches: int | None = None
    """Micro-batches per source; None = the whole validation split."""
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (configs/eval/, eval.include_path, lm-eval's registry); empty = the
    validation loss of the checkpoint's own data. Needs `pip install -e .[eval]`."""
    include_path: str | None = None
    """A folder of the user's own task YAMLs (lm-eval's --include_path); configs/eval is always searched."""
    registry: bool = True
    """Also search lm-eval's built-in registry (a scan of ~15k YAMLs, seconds) for names not found above."""
    limit: float | None = None
    """Documents per task: a count, or a fraction when < 1; None = all (lm-eval's --limit)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt; None = each task's own default (lm-eval's --num_fewshot)."""
    batch_size: int | None = None
    """Requests per forward for eval.tasks; None = eval.micro_batch_size."""
    max_gen_toks: int = 256
    """Generation length when a task's generation_kwargs do not set max_gen_toks."""
    worst: int = 0
    """Print the K examples of each task the model got most wrong (error analysis); 0 = none."""
    log_samples: bool = True
    """Write every example (prompt, target, response, metrics) beside results.json."""
    bootstrap_iters: int = 100000
    """lm-eval's bootstrap resamples for the stderr of non-mean metrics (BLEU); 0 = no stderr."""


def check_eval_config(ev: EvalConfig) -> None:
    check(ev.micro_batch_size > 0, "eval.micro_batch_size", f"must be positive, got {ev.micro_batch_size}")
    check(
        ev.batch_size is None or ev.batch_size > 0,
        "eval.batch_size",
        f"must be positive, got {ev.batch_size}",
    )
    check(
        ev.limit is None or ev.limit > 0, "eval.limit", f"must be positive (or null for all), got {ev.limit}"
    )
    check(
        ev.num_fewshot is None or ev.num_fewshot >= 0,
        "eval.num_fewshot",
        f"must not be negative, got {ev.num_fewshot}",
    )
    check(ev.max_gen_toks > 0, "eval.max_gen_toks", f"must be positive, got {ev.max_gen_toks}")
    check(ev.worst >= 0, "eval.worst", f"must not be negative (0 = none), got {ev.worst}")
    check(ev.bootstrap_iters >= 0, "eval.bootstrap_iters", f"must not be negative, got {ev.bootstrap_iters}")
    check(all(isinstance(t, str) and t for t in ev.tasks), "eval.tasks", "task names must be non-empty")


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
    chat: ChatConfig = field(default_factory=ChatConfig)
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
    check_generate_config(cfg.generate)
    check_eval_config(cfg.eval)
    check_chat_config(cfg.chat)
    check(bool(cfg.resume), "resume", "must be auto, none or a checkpoint folder")
    if cfg.optim.name == "muon":
        check(
            not cfg.deepspeed.offload_optimizer,
            "optim.name",
            "muon cannot run with deepspeed.offload_optimizer=true (ZeRO-Offload steps DeepSpeed's CPU Adam "
            "only); use optim=adamw there",
        )
        check(
            cfg.train.grad_clip == 0,
            "train.grad_clip",
            f"is {cfg.train.grad_clip}, but optim=muon needs 0: DeepSpeed (ZeRO 1-3) clips Muon's "
            "orthogonalized update rather than the gradient, which silently divides the Muon lr by the "
            "update's norm (measured 45x on the tiny model); `optim=muon` sets it",
        )
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
