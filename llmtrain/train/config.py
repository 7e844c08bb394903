"""Typed configuration of a training run: run identity, loop, optimizer, schedule, DeepSpeed,
checkpoints and logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmtrain.errors import ConfigError, check, check_choice

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "muon")
MUON_NS_METHODS = ("gram", "standard")
SCHEDULES = ("cosine", "wsd", "constant")
ZERO_STAGES = (0, 1, 2, 3)
WANDB_MODES = ("online", "offline", "disabled")
NONFINITE_ACTIONS = ("skip", "rollback", "stop")
SYNC_DEBUG_MODES = ("off", "warn", "error")
# Keys of the generated DeepSpeed config that the trainer and the loader rely on; a raw override of
# them would make DeepSpeed's view of the batch differ from ours.
DS_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


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
    precision: str = "auto"
    """auto | bf16 | fp16 | fp32. auto: bf16 on a GPU that has it (else fp16), bf16 on a CPU with native
    bf16 (AVX-512 BF16, AMX, Arm BF16), fp32 on other CPUs, where bf16 matmuls run ~35x slower."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    step_on_device: bool = True
    """Clip and skip non-finite updates inside the fused AdamW on the device, so no step waits on a host
    read (fp32 ZeRO-0 and bf16 ZeRO 1/2 with optim=adamw; elsewhere DeepSpeed decides, reading the norm
    on the host every step). False: DeepSpeed decides everywhere."""
    sync_debug: str = "off"
    """off | warn | error. On a GPU, torch.cuda.set_sync_debug_mode between logging steps: warn or fail
    at any host synchronisation inside the training step (a CPU ignores it)."""
    val_every: int = 200
    """Validate every N steps (and at the end); 0 disables."""
    val_batches: int | None = 20
    """Micro-batches per validation pass; None = the whole validation split."""
    init_from: str | None = None
    """Pretrained weights that start a fresh run (continued pretraining, fine-tuning), with this run's own
    data, schedule and optimizer; ignored when resuming. One of our checkpoints (`<run>/checkpoints/step_N`,
    or a run folder: its newest complete checkpoint; verified against its manifest, any ZeRO stage and
    world size), or a Hugging Face folder (config.json + model.safetensors, e.g. from `llmtrain export`).
    Its model.* shape and its tokenizer must be this run's."""
    init_optimizer: bool = False
    """Also take the optimizer state (Adam moments, Muon momentum) of an `init_from` checkpoint saved with
    this world size, ZeRO stage and optimizer; the run's own lr, schedule and data still apply from
    step 0. False: a fresh optimizer (`resume=` continues a run with everything it had)."""
    collective_timeout_s: float = 600.0
    """A collective that waits longer than this (a stalled or dead rank) fails the job on every rank."""
    eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run during training (every rank scores a share), logged to
    metrics.jsonl and wandb as eval/<task>/<metric>; eval.include_path / limit / num_fewshot /
    batch_size apply. Needs `pip install -e .[eval]`."""
    eval_every: int = 0
    """Run train.eval_tasks every N steps (and at the end); 0 = off."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | muon. muon: DeepSpeed's MuonWithAuxAdam, orthogonalized momentum (Jordan et al. 2024,
    "Muon") for the hidden weight matrices, AdamW for embeddings, the output head, norms and biases."""
    lr: float = 3e-4
    """AdamW's peak learning rate (with optim=muon: of the AdamW half). The schedule scales every
    parameter group by the same factor, so optim.muon_lr follows the same warmup and decay."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay of the matrices it optimizes (with optim=muon: the head, and the
    embeddings when decay_embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    decay_norms_and_biases: bool = False
    decay_embeddings: bool = False
    muon_lr: float = 0.02
    """optim=muon: peak learning rate of the hidden matrices (Muon's update has unit spectral scale,
    times sqrt(rows/cols) for tall matrices, so it is not comparable to optim.lr)."""
    muon_momentum: float = 0.95
    """optim=muon: Nesterov momentum of the Muon half."""
    muon_weight_decay: float = 0.0
    """optim=muon: decoupled weight decay of the hidden matrices (applied as w -= lr * wd * w)."""
    muon_ns_method: str = "gram"
    """optim=muon: Newton-Schulz variant, gram (iterates on the small Gram matrix) | standard (quintic NS5)."""


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
    partitioned_init: bool = True
    """ZeRO-3: build the model with its parameters partitioned from the start (deepspeed.zero.Init), so
    no rank ever holds the whole model; the same initial weights as the eager build, bit for bit."""
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
    trust_unverified: bool = False
    """Load a checkpoint that has no MANIFEST.json (made elsewhere) although its files cannot be
    verified before DeepSpeed unpickles them."""
    convert_workers: int = 0
    """Processes of a universal conversion (world size or ZeRO stage changed); 0 = one per core, up to 16."""
    convert_timeout_s: float = 6 * 3600
    """How long the other ranks wait for rank 0's universal conversion (not train.collective_timeout_s:
    a 7B conversion takes minutes)."""


@dataclass
class GuardConfig:
    """What to do when training goes non-finite or the loss spikes; every rank takes the same action."""

    nonfinite: str = "skip"
    """skip (drop the update) | rollback (reload the last good checkpoint, skip `skip_batches`) | stop."""
    max_consecutive_skips: int = 5
    """This many skipped steps in a row stop the run (non-zero exit), naming the step and the cause."""
    skip_batches: int = 0
    """rollback only: global batches to skip after reloading (PaLM's remedy for a spike)."""
    spike_sigma: float | None = None
    """A loss more than this many standard deviations above the running window counts as a spike
    (handled by `nonfinite`'s action); None disables the detector."""
    spike_window: int = 50
    """Logged losses in the detector's running window."""


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


def check_train_config(train: TrainConfig, *, max_seq_len: int) -> None:
    """Raise ConfigError naming the first `train.*` value that cannot work."""
    check(train.max_steps > 0, "train.max_steps", f"must be positive, got {train.max_steps}")
    check(
        train.micro_batch_size > 0,
        "train.micro_batch_size",
        f"must be positive, got {train.micro_batch_size}",
    )
    glob = train.global_batch_size
    check(glob is None or glob > 0, "train.global_batch_size", f"must be positive, got {glob}")
    check(train.seq_len > 0, "train.seq_len", f"must be positive, got {train.seq_len}")
    check(
        train.seq_len <= max_seq_len,
        "train.seq_len",
        f"{train.seq_len} exceeds model.max_seq_len={max_seq_len}",
    )
    check_choice(train.precision, PRECISIONS, "train.precision")
    check_choice(train.sync_debug, SYNC_DEBUG_MODES, "train.sync_debug")
    check(
        train.grad_clip >= 0, "train.grad_clip", f"must not be negative (0 disables), got {train.grad_clip}"
    )
    check(train.val_every >= 0, "train.val_every", "must not be negative (0 disables)")
    vb = train.val_batches
    check(vb is None or vb > 0, "train.val_batches", f"must be positive (or null for all), got {vb}")
    check(
        train.init_from is not None or not train.init_optimizer,
        "train.init_optimizer",
        "needs train.init_from (the checkpoint whose optimizer state to take)",
    )
    check(
        train.collective_timeout_s > 0,
        "train.collective_timeout_s",
        f"must be positive, got {train.collective_timeout_s}",
    )
    check(
        train.eval_every >= 0, "train.eval_every", f"must not be negative (0 = off), got {train.eval_every}"
    )
    check(
        not (train.eval_every > 0 and not train.eval_tasks),
        "train.eval_every",
        f"{train.eval_every} needs train.eval_tasks=[...] (or 0 for no in-loop evaluation)",
    )
    check(
        not (train.eval_tasks and train.eval_every == 0),
        "train.eval_tasks",
        "are set but train.eval_every=0 (off); set train.eval_every=N",
    )


def check_optim_config(optim: OptimConfig) -> None:
    check_choice(optim.name.lower(), OPTIMIZERS, "optim.name")
    check(optim.lr > 0, "optim.lr", f"must be positive, got {optim.lr}")
    check(optim.weight_decay >= 0, "optim.weight_decay", f"must not be negative, got {optim.weight_decay}")
    for key in ("beta1", "beta2"):
        value = getattr(optim, key)
        check(0 <= value < 1, f"optim.{key}", f"must be in [0, 1), got {value}")
    check(optim.eps > 0, "optim.eps", f"must be positive, got {optim.eps}")
    check(optim.muon_lr > 0, "optim.muon_lr", f"must be positive, got {optim.muon_lr}")
    check(
        0 <= optim.muon_momentum < 1, "optim.muon_momentum", f"must be in [0, 1), got {optim.muon_momentum}"
    )
    check(
        optim.muon_weight_decay >= 0,
        "optim.muon_weight_decay",
        f"must not be negative, got {optim.muon_weight_decay}",
    )
    check_choice(optim.muon_ns_method, MUON_NS_METHODS, "optim.muon_ns_method")


def check_schedule_config(schedule: ScheduleConfig) -> None:
    check_choice(schedule.name, SCHEDULES, "schedule.name")
    check(
        schedule.warmup_steps >= 0,
        "schedule.warmup_steps",
        f"must not be negative, got {schedule.warmup_steps}",
    )
    total = schedule.total_steps
    check(total is None or total > 0, "schedule.total_steps", f"must be positive, got {total}")
    for key in ("min_lr_ratio", "decay_fraction"):
        value = getattr(schedule, key)
        check(0.0 <= value <= 1.0, f"schedule.{key}", f"must be in [0, 1], got {value}")


def check_deepspeed_config(ds: DeepSpeedConfig, *, precision: str) -> None:
    """Our keys and the raw `deepspeed.config` block together: what DeepSpeed will actually see."""
    check_choice(ds.zero_stage, ZERO_STAGES, "deepspeed.zero_stage")
    raw = ds.config
    for key in DS_OWNED_KEYS:
        if key in raw:
            raise ConfigError(
                f"deepspeed.config.{key}={raw[key]} conflicts with the train.* batch settings; "
                "set train.micro_batch_size / train.global_batch_size instead"
            )
    for key in ("optimizer", "scheduler"):
        if key in raw:
            raise ConfigError(
                f"deepspeed.config.{key}: the optimizer and lr schedule come from optim.* and schedule.*; "
                "remove this key"
            )
    enabled = {k for k in ("bf16", "fp16") if (raw.get(k) or {}).get("enabled", precision == k)}
    if len(enabled) == 2:
        raise ConfigError("deepspeed.config: bf16 and fp16 cannot both be enabled (use train.precision)")
    zero = raw.get("zero_optimization") or {}
    stage = zero.get("stage", ds.zero_stage)
    if stage not in ZERO_STAGES:
        raise ConfigError(f"deepspeed.config.zero_optimization.stage must be 0-3, got {stage}")
    if ds.offload_params:
        check(stage == 3, "deepspeed.offload_params", "needs deepspeed.zero_stage=3")
    elif zero.get("offload_param") and stage != 3:
        raise ConfigError("deepspeed.config.zero_optimization.offload_param needs stage 3")
    if ds.offload_optimizer:
        check(stage >= 1, "deepspeed.offload_optimizer", "needs deepspeed.zero_stage>=1")
    elif zero.get("offload_optimizer") and stage == 0:
        raise ConfigError("deepspeed.config.zero_optimization.offload_optimizer needs stage >= 1")


def check_checkpoint_config(ckpt: CheckpointConfig) -> None:
    check(ckpt.keep_last >= 1, "checkpoint.keep_last", f"must be at least 1, got {ckpt.keep_last}")
    check(ckpt.every_steps >= 0, "checkpoint.every_steps", "must not be negative (0 disables)")
    minutes = ckpt.every_minutes
    check(minutes is None or minutes > 0, "checkpoint.every_minutes", f"must be positive, got {minutes}")
    check(ckpt.convert_workers >= 0, "checkpoint.convert_workers", "must not be negative (0 = one per core)")
    check(
        ckpt.convert_timeout_s > 0,
        "checkpoint.convert_timeout_s",
        f"must be positive, got {ckpt.convert_timeout_s}",
    )


def check_logging_config(log: LoggingConfig) -> None:
    check(log.every_steps >= 1, "logging.every_steps", f"must be at least 1, got {log.every_steps}")
    check_choice(log.wandb.mode, WANDB_MODES, "logging.wandb.mode")


def check_guard_config(guard: GuardConfig) -> None:
    check_choice(guard.nonfinite, NONFINITE_ACTIONS, "guard.nonfinite")
    check(guard.max_consecutive_skips >= 1, "guard.max_consecutive_skips", "must be at least 1")
    check(guard.skip_batches >= 0, "guard.skip_batches", f"must not be negative, got {guard.skip_batches}")
    sigma = guard.spike_sigma
    check(
        sigma is None or sigma > 0, "guard.spike_sigma", f"must be positive (or null to disable), got {sigma}"
    )
    check(guard.spike_window >= 2, "guard.spike_window", f"must be at least 2, got {guard.spike_window}")
