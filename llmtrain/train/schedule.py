"""The learning rate as a pure function of the optimizer step.

Step numbering: `step` is the number of optimizer updates already applied, so the update that takes
the model from step s to step s+1 uses `lr_at(s)`. The first update uses `lr_at(0)`, and a run
resumed at step s continues with `lr_at(s)`: the schedule needs no state of its own beyond the step
stored in the checkpoint.

Warmup is linear and never yields zero: `lr_at(s) = base_lr * (s + 1) / warmup_steps` for
s < warmup_steps, so the last warmup update uses the full base_lr. `warmup_steps = 0` skips it.

The horizon `schedule.total_steps` (None = `train.max_steps`) is kept apart from `max_steps`, so a
run can be stopped early and extended later without changing its curve. At and past the horizon the
lr stays at the floor `min_lr_ratio * base_lr` (cosine, wsd).

- cosine: warmup, then a half cosine from base_lr at `warmup_steps` down to the floor at the horizon.
- wsd: warmup, then base_lr held until the last `decay_fraction * total_steps` steps, then a linear
  decay to the floor at the horizon (linear, as in MiniCPM's WSD; not the 1-sqrt variant).
- constant: warmup, then base_lr forever.
"""

from __future__ import annotations

import math

from llmtrain.config import ConfigError
from llmtrain.train.config import ScheduleConfig

SCHEDULES = ("cosine", "wsd", "constant")


def horizon(schedule: ScheduleConfig, max_steps: int) -> int:
    """The schedule's last step: `schedule.total_steps`, or `train.max_steps` when unset."""
    return schedule.total_steps if schedule.total_steps is not None else max_steps


def _check(schedule: ScheduleConfig, total: int) -> None:
    if schedule.name not in SCHEDULES:
        raise ConfigError(f"schedule.name: must be one of {', '.join(SCHEDULES)}, got {schedule.name!r}")
    if total <= 0:
        raise ConfigError(f"schedule.total_steps: must be positive, got {total}")
    if schedule.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps: must not be negative, got {schedule.warmup_steps}")
    if not 0.0 <= schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio: must be in [0, 1], got {schedule.min_lr_ratio}")
    if not 0.0 <= schedule.decay_fraction <= 1.0:
        raise ConfigError(f"schedule.decay_fraction: must be in [0, 1], got {schedule.decay_fraction}")


def lr_at(step: int, *, base_lr: float, schedule: ScheduleConfig, max_steps: int) -> float:
    """Learning rate of the update applied after `step` completed updates (see module docstring)."""
    if step < 0:
        raise ValueError(f"step must not be negative, got {step}")
    total = horizon(schedule, max_steps)
    _check(schedule, total)
    warmup = schedule.warmup_steps
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule.name == "constant":
        return base_lr
    floor = base_lr * schedule.min_lr_ratio
    if step >= total:
        return floor
    if schedule.name == "cosine":
        progress = (step - warmup) / (total - warmup)
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: the decay starts `decay_fraction` of the horizon before its end, never inside warmup.
    decay_start = max(warmup, total - round(schedule.decay_fraction * total))
    if step < decay_start:
        return base_lr
    progress = (step - decay_start) / (total - decay_start)
    return base_lr + (floor - base_lr) * progress


def build_scheduler(
    optimizer, *, base_lr: float, schedule: ScheduleConfig, max_steps: int, start_step: int = 0
):
    """A `torch.optim.lr_scheduler.LambdaLR` that sets every group's lr to `lr_at(step)`.

    For code that wants a scheduler object (DeepSpeed's `lr_scheduler=` argument, the bare-loop
    benchmark). Each group's `initial_lr` is pinned to `base_lr`, so `scheduler.step()` after update s
    leaves `lr_at(s + 1)` in the groups; `start_step` positions it for a resumed run.
    """
    from torch.optim.lr_scheduler import LambdaLR

    _check(schedule, horizon(schedule, max_steps))
    for group in optimizer.param_groups:
        group["initial_lr"] = base_lr

    def factor(step: int) -> float:
        return lr_at(step, base_lr=base_lr, schedule=schedule, max_steps=max_steps) / base_lr

    return LambdaLR(optimizer, factor, last_epoch=start_step - 1)
