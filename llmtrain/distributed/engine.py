"""The one place that talks to DeepSpeed's setup: process group, seeding, config dict, engine.

Everything about parallelism lives here, so the model stays a plain `nn.Module` and the trainer
reads as a plain loop.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import random
import socket
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmtrain.config import Config, ConfigError, batch_layout

# DeepSpeed prints its own progress every `steps_per_print` steps; we log ourselves.
_NEVER = 2**31 - 1
# Set once this process made its own world of one (so the env we wrote is not mistaken for a launcher's).
_SELF_WORLD = False
# Keys of the generated config that the trainer and the loader rely on; a raw override of them would
# make DeepSpeed's view of the batch differ from ours.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    launched: bool
    """True when a launcher set RANK etc.; False for a plain process that made its own world of one."""


def has_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or create) the process group: under a launcher from its env, alone as rank 0 of 1.

    A plain `llmtrain train` without the launcher gets the env a launcher would have set, on a free
    port, so DeepSpeed sees the same world either way.
    """
    if not has_gpu():
        # Before the first deepspeed import: picks the CPU accelerator without probing for CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    global _SELF_WORLD
    launched = "RANK" in os.environ and not _SELF_WORLD
    if not launched:
        _SELF_WORLD = True
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    import torch.distributed as dist

    quiet = not os.environ.get("LLMTRAIN_DEBUG")
    if quiet:
        # DeepSpeed's INFO lines (configs, timers) and torch's deprecation notices about the
        # collectives DeepSpeed calls drown the progress output; LLMTRAIN_DEBUG=1 shows them.
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if has_gpu():
        # Before the process group: NCCL binds each rank to the current device.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if has_gpu() else "gloo"
    if not dist.is_initialized():
        # On CPU ranks DeepSpeed prints "... shm_comm_op built successfully" on stdout from every rank.
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(
        rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend, launched=launched
    )


def shutdown() -> None:
    """Leave the process group (at the end of a launched run; a plain process keeps its world of one
    so that a second run in the same interpreter, as in tests, joins it again)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and all GPUs) with one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Per-rank seed for dropout and the like: ranks must not draw the same noise."""
    return seed + 1_000_003 * rank


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursing into dicts present in both; neither input is changed."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(cfg: Config, world_size: int, *, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's config dict from ours, with `deepspeed.config` merged over it; checked."""
    glob, accum = batch_layout(cfg, world_size)
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage in (1, 2):
        # On GPUs: contiguous gradient buffers (less fragmentation) and reduction overlapped with the
        # backward pass. On CPU ranks both only add copies (measured: ZeRO-1 on one process went from
        # 9% to 3% slower than a bare loop without the contiguous buffer).
        zero.update(contiguous_gradients=has_gpu(), overlap_comm=has_gpu())
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": has_gpu()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": has_gpu()}
    precision = cfg.train.precision
    config: dict[str, Any] = {
        "train_batch_size": glob,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.train.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "loss_scale_window": ds.loss_scale_window,
            "initial_scale_power": ds.initial_scale_power,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        # We hand DeepSpeed a torch AdamW; ZeRO accepts it, but only after this opt-in.
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
    }
    merged = deep_merge(config, ds.config)
    _check_merged(merged, config)
    return merged


def _check_merged(merged: dict[str, Any], ours: dict[str, Any]) -> None:
    for key in _OWNED_KEYS:
        if merged.get(key) != ours[key]:
            raise ConfigError(
                f"deepspeed.config.{key}={merged.get(key)} conflicts with the train.* batch settings "
                f"({ours[key]}); set train.micro_batch_size / train.global_batch_size instead"
            )
    for key in ("optimizer", "scheduler"):
        if key in merged:
            raise ConfigError(
                f"deepspeed.config.{key}: the optimizer and lr schedule come from optim.* and schedule.*; "
                "remove this key"
            )
    if merged.get("bf16", {}).get("enabled") and merged.get("fp16", {}).get("enabled"):
        raise ConfigError("deepspeed.config: bf16 and fp16 cannot both be enabled (use train.precision)")
    zero = merged.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.config.zero_optimization.stage must be 0-3, got {stage}")
    if zero.get("offload_param") and stage != 3:
        raise ConfigError("deepspeed.config.zero_optimization.offload_param needs stage 3")
    if zero.get("offload_optimizer") and stage == 0:
        raise ConfigError("deepspeed.config.zero_optimization.offload_optimizer needs stage >= 1")


def _check_precision(ds_config: dict[str, Any]) -> None:
    """A clear error instead of DeepSpeed's traceback when the device lacks the chosen precision."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for key, supported in (("fp16", accelerator.is_fp16_supported), ("bf16", accelerator.is_bf16_supported)):
        if ds_config.get(key, {}).get("enabled") and not supported():
            raise ConfigError(
                f"train.precision={key}: not supported by this device ({accelerator.device_name()}); "
                "use train.precision=bf16 or fp32"
            )


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def build_optimizer(
    param_groups: list[dict], cfg: Config, ds_config: dict[str, Any]
) -> torch.optim.Optimizer:
    """torch AdamW; DeepSpeed's CPU Adam (AdamW mode) when the optimizer state lives on the CPU.

    ZeRO-Offload refuses a client torch optimizer (`zero_force_ds_cpu_optimizer`), since stepping
    it on the host is several times slower than the vectorised CPU Adam.
    """
    from llmtrain.train.optim import adamw, check_optimizer_name

    o = cfg.optim
    if not offloads_optimizer(ds_config):
        return adamw(param_groups, o, o.lr)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    check_optimizer_name(o)
    return DeepSpeedCPUAdam(
        param_groups,
        adamw_mode=True,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )


def build_engine(
    model: torch.nn.Module,
    param_groups: list[dict],
    cfg: Config,
    world_size: int,
    *,
    load_universal: bool = False,
):
    """Wrap the model in a DeepSpeed engine; returns (engine, ds_config)."""
    import deepspeed

    ds_config = build_ds_config(cfg, world_size, load_universal=load_universal)
    _check_precision(ds_config)
    optimizer = build_optimizer(param_groups, cfg, ds_config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_config


def repair_after_load(engine, weight_decays: list[float], cfg: Config) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19), harmless on every other path.

    It copies group 0's hyperparameters onto every group (the no-decay group would get weight decay)
    and puts ONE `step` tensor into the state of every sub-group, so each optimizer step advances it
    once per group and Adam's bias correction drifts. Found by comparing a 2-rank -> 1-rank resume
    with the uninterrupted run; with this repair they match bit for bit.
    """
    groups = engine.optimizer.param_groups
    if len(groups) != len(weight_decays):
        raise RuntimeError(f"optimizer has {len(groups)} parameter groups, expected {len(weight_decays)}")
    for group, decay in zip(groups, weight_decays):
        group.update(weight_decay=decay, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in getattr(inner, "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every parameter group (the schedule is ours, not DeepSpeed's)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
