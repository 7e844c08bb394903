"""The learning-rate schedules: exact values at the landmarks, monotonicity, horizon independence."""

from __future__ import annotations

import pytest

from llmtrain.errors import ConfigError
from llmtrain.train.config import ScheduleConfig, check_schedule_config
from llmtrain.train.schedule import lr_at

LR = 3e-4


def lrs(schedule: ScheduleConfig, max_steps: int, upto: int | None = None) -> list[float]:
    return [lr_at(s, base_lr=LR, schedule=schedule, max_steps=max_steps) for s in range(upto or max_steps)]


def test_warmup_is_linear_and_first_update_is_not_zero():
    sched = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    values = lrs(sched, 100, upto=10)
    assert values[0] == pytest.approx(LR / 10, rel=1e-12)
    assert values == pytest.approx([LR * (s + 1) / 10 for s in range(10)], rel=1e-12)
    assert lr_at(9, base_lr=LR, schedule=sched, max_steps=100) == LR


def test_cosine_landmarks_and_floor_after_horizon():
    sched = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    floor = 0.1 * LR
    assert lr_at(10, base_lr=LR, schedule=sched, max_steps=110) == pytest.approx(LR, rel=1e-12)
    # halfway through the decay the cosine is at the midpoint between peak and floor
    assert lr_at(60, base_lr=LR, schedule=sched, max_steps=110) == pytest.approx((LR + floor) / 2, rel=1e-12)
    assert lr_at(110, base_lr=LR, schedule=sched, max_steps=110) == pytest.approx(floor, rel=1e-12)
    assert lr_at(5000, base_lr=LR, schedule=sched, max_steps=110) == pytest.approx(floor, rel=1e-12)
    decay = lrs(sched, 110)[10:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert min(decay) > floor


def test_warmup_zero_starts_at_base_lr():
    for name in ("cosine", "wsd", "constant"):
        sched = ScheduleConfig(name=name, warmup_steps=0, min_lr_ratio=0.0)
        assert lr_at(0, base_lr=LR, schedule=sched, max_steps=50) == LR


def test_wsd_is_stable_then_linear_decay_over_last_fraction():
    sched = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    values = lrs(sched, 100)
    assert values[10:80] == [LR] * 70
    # decay runs over steps 80..100, linearly, reaching the floor (0) at the horizon
    assert values[90] == pytest.approx(LR / 2, rel=1e-12)
    assert values[99] == pytest.approx(LR / 20, rel=1e-12)
    diffs = [a - b for a, b in zip(values[80:], values[81:])]
    assert diffs == pytest.approx([LR / 20] * 19, rel=1e-9)
    assert lr_at(100, base_lr=LR, schedule=sched, max_steps=100) == 0.0


def test_wsd_with_floor():
    sched = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.5, min_lr_ratio=0.1)
    assert lr_at(200, base_lr=LR, schedule=sched, max_steps=100) == pytest.approx(0.1 * LR, rel=1e-12)
    assert lr_at(75, base_lr=LR, schedule=sched, max_steps=100) == pytest.approx(0.55 * LR, rel=1e-12)


def test_constant_after_warmup():
    sched = ScheduleConfig(name="constant", warmup_steps=5)
    assert lrs(sched, 1000)[5:] == [LR] * 995


def test_total_steps_decouples_horizon_from_max_steps():
    """A run stopped at 60 steps of a 120-step horizon, then extended, sees the same curve."""
    short = ScheduleConfig(name="cosine", warmup_steps=10, total_steps=120)
    full = ScheduleConfig(name="cosine", warmup_steps=10, total_steps=None)
    assert lrs(short, 60) == lrs(full, 120)[:60]
    assert lrs(short, 60) != lrs(ScheduleConfig(name="cosine", warmup_steps=10), 60)


def test_bad_schedule_names_the_key():
    """Checked once, where the dataclass is (load_config calls it before any rank starts)."""
    with pytest.raises(ConfigError, match="schedule.name"):
        check_schedule_config(ScheduleConfig(name="linear"))
    with pytest.raises(ConfigError, match="schedule.decay_fraction"):
        check_schedule_config(ScheduleConfig(name="wsd", decay_fraction=1.5))
    with pytest.raises(ConfigError, match="schedule.total_steps"):
        check_schedule_config(ScheduleConfig(total_steps=0))
