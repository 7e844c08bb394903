"""DeepSpeed's config dict, generated from ours in one place (values were validated at compose time)."""

from __future__ import annotations

import copy
from typing import Any

from llmtrain.config import Config, batch_layout
from llmtrain.distributed.runtime import has_gpu, resolve_precision

# DeepSpeed prints its own progress every `steps_per_print` steps; we log ourselves.
_NEVER = 2**31 - 1


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursing into dicts present in both; neither input is changed."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(
    cfg: Config, world_size: int, *, load_universal: bool = False, steps_on_device: bool = False
) -> dict[str, Any]:
    """DeepSpeed's config dict from ours, with `deepspeed.config` merged over it.

    `steps_on_device`: our fused AdamW clips and skips non-finite steps on the device
    (llmtrain.distributed.device_step), so DeepSpeed is told to do neither.
    """
    glob, accum = batch_layout(cfg, world_size)
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage in (1, 2):
        # On GPUs: contiguous gradient buffers (less fragmentation), and the reduction overlapped with
        # the backward pass where there is a reduction to overlap. On CPU ranks both only add copies
        # (measured: ZeRO-1 on one process went from 9% to 3% slower than a bare loop without the
        # contiguous buffer).
        zero.update(contiguous_gradients=has_gpu(), overlap_comm=overlaps_comm(world_size, on_gpu=has_gpu()))
    if cfg.optim.name == "muon" and ds.zero_stage == 3:
        # ZeRO-3's Muon gathers each whole gradient matrix to orthogonalize it; DeepSpeed refuses that
        # together with its reduce-scatter of gradient partitions
        zero["reduce_scatter"] = False
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": has_gpu()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": has_gpu()}
    precision, _ = resolve_precision(cfg.train.precision)
    config: dict[str, Any] = {
        "train_batch_size": glob,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0 if steps_on_device else float(cfg.train.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": not steps_on_device},
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
        # DeepSpeed's samples/s timer is on by default and synchronizes the whole device at every
        # forward and every step (utils/timer.py); we time steps ourselves, with CUDA events.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        # We hand DeepSpeed a torch AdamW; ZeRO accepts it, but only after this opt-in.
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
    }
    return deep_merge(config, ds.config)


def overlaps_comm(world_size: int, *, on_gpu: bool) -> bool:
    """ZeRO 1/2's `overlap_comm`: on GPUs, and only with more than one rank.

    With it DeepSpeed 0.19.8 calls `get_accelerator().synchronize()` (the whole device, from the host)
    before each bucket's reduction and after the backward (stage_1_and_2.py), several host syncs per
    step; that buys the overlap of reduction with the backward, which a single rank does not have.
    """
    return on_gpu and world_size > 1


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


# Keys of `deepspeed.config` that change how DeepSpeed clips, checks or steps; with any of them set by
# the user, DeepSpeed keeps those decisions (llmtrain.distributed.backend).
_STEP_KEYS = ("gradient_clipping", "bf16", "fp16", "data_types", "optimizer", "torch_autocast")
_ZERO_STEP_KEYS = ("stage", "compute_grad_norm", "offload_optimizer", "offload_param", "cpu_offload")


def can_step_on_device(cfg: Config, ds_config: dict[str, Any]) -> bool:
    """Whether clipping and the non-finite skip can move into our fused AdamW (see
    llmtrain.distributed.device_step): where DeepSpeed then steps it with no host read of its own.

    That is fp32 ZeRO-0 (DeepSpeed steps the optimizer directly) and bf16 ZeRO 1/2 (its optimizer
    wrapper skips its checks when told to). fp16 needs DeepSpeed's loss scaler, ZeRO-3 and its bf16
    ZeRO-0 wrapper read the norm on the host whatever they are told, and offload steps DeepSpeed's
    CPU Adam.
    """
    if not cfg.train.step_on_device or cfg.optim.name != "adamw" or offloads_optimizer(ds_config):
        return False
    user, user_zero = cfg.deepspeed.config, cfg.deepspeed.config.get("zero_optimization") or {}
    if any(key in user for key in _STEP_KEYS) or any(key in user_zero for key in _ZERO_STEP_KEYS):
        return False
    precision, _ = resolve_precision(cfg.train.precision)
    stage = cfg.deepspeed.zero_stage
    return (stage == 0 and precision == "fp32") or (stage in (1, 2) and precision == "bf16")
