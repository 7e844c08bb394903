"""The learning rate as a pure function of the optimizer step.

Step numbering: `step` is the number of optimizer updates already applied, so the update that takes
the model from step s to step s+1 uses `lr_at(s)`. The first update uses `lr_at(0)`, and a run
resumed at step s continues with `lr_at(s)`: the schedule needs no state of its own beyond the step
stored in the checkpoint.

Warmup is linear and never yields zero: `lr_at(s) = base_lr * (s + 1) / warmup_steps` for
s < warmup_steps, so the last warmup update uses the full base_lr. `warmup_steps = 0` skips it.

The horizon `schedule.total_steps` (None = `train.max_steps`) is kept apart from `max_steps`, so a
run can be stopped early and extended later without changing its curve. At and past the horizon the
lr stays at the floor `min_lr_ratio * base_lr` (cosine, wsd). The horizon a run starts with is one of
its fixed terms: saved in every checkpoint and kept on resume unless `schedule.total_steps` is given
(see `llmtrain.train.run_terms`). Values are validated once, at compose time (`check_schedule_config`).

- cosine: warmup, then a half cosine from base_lr at `warmup_steps` down to the floor at the horizon.
- wsd: warmup, then base_lr held until the last `decay_fraction * total_steps` steps, then a linear
  decay to the floor at the horizon (linear, as in MiniCPM's WSD; not the 1-sqrt variant).
- constant: warmup, then base_lr forever.
"""

from __future__ import annotations

import math

from llmtrain.train.config import ScheduleConfig


def horizon(schedule: ScheduleConfig, max_steps: int) -> int:
    """The schedule's last step: `schedule.total_steps`, or `train.max_steps` when unset."""
    return schedule.total_steps if schedule.total_steps is not None else max_steps


def lr_at(step: int, *, base_lr: float, schedule: ScheduleConfig, max_steps: int) -> float:
    """Learning rate of the update applied after `step` completed updates (see module docstring)."""
    if step < 0:
        raise ValueError(f"step must not be negative, got {step}")
    total = horizon(schedule, max_steps)
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
