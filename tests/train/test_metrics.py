"""MetricsLogger: metrics.jsonl content and precision, resume truncation, plot, wandb id reuse."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llmtrain.config import Config
from llmtrain.train.metrics import MetricsLogger, plot_loss_curve, read_metrics


@pytest.fixture
def cfg() -> Config:
    cfg = Config()
    cfg.run.name = "metrics-test"
    cfg.logging.wandb.mode = "disabled"
    return cfg


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_keeps_full_precision_and_all_keys(cfg, tmp_path, capsys):
    loss32 = torch.tensor(2.718281828459045, dtype=torch.float32)
    with MetricsLogger(cfg, tmp_path, 0, start_step=0, total_steps=10) as logger:
        logger.log(
            1,
            {
                "loss": loss32,
                "lr": 0.1 + 0.2,
                "grad_norm": np.float64(1 / 3),
                "tokens_per_s": 12345.678,
                "mfu": None,
                "mem_gb": float("nan"),
                "tokens": 4096,
            },
        )
        logger.log_val(1, {"val_loss": 1 / 7, "val/stdlib/loss": 1 / 7, "val/stdlib/ppl": math.exp(1 / 7)})
    first, val = lines(tmp_path / "metrics.jsonl")
    assert first == {
        "step": 1,
        "loss": loss32.item(),
        "lr": 0.1 + 0.2,
        "grad_norm": 1 / 3,
        "tokens_per_s": 12345.678,
        "mfu": None,
        "mem_gb": None,
        "tokens": 4096,
    }
    assert first["loss"] != 2.718281828459045  # the float32 value itself, not a rounded print of it
    assert isinstance(first["tokens"], int)
    assert val == {"step": 1, "val_loss": 1 / 7, "val/stdlib/loss": 1 / 7, "val/stdlib/ppl": math.exp(1 / 7)}
    out = capsys.readouterr().out  # not a terminal: plain progress lines with an ETA
    assert "step 1/10 | loss 2.7183 | lr 3.000e-01" in out and "eta" in out
    assert "val_loss 0.1429" in out


def test_other_ranks_write_nothing(cfg, tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(cfg, run_dir, 1, wandb_run_id="abc123", start_step=0, total_steps=10)
    logger.log(1, {"loss": 1.0})
    logger.log_val(1, {"val_loss": 1.0})
    logger.close()
    assert not run_dir.exists()
    assert logger.wandb_run_id == "abc123"


def test_resume_drops_records_past_the_checkpoint_and_appends(cfg, tmp_path):
    logger = MetricsLogger(cfg, tmp_path, 0, start_step=0, total_steps=10)
    for step in range(1, 7):
        logger.log(step, {"loss": 10.0 / step})
    logger.log_val(5, {"val_loss": 2.5})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.4')  # a crash mid-write
    logger = MetricsLogger(cfg, tmp_path, 0, start_step=4, total_steps=10)
    for step in range(5, 9):
        logger.log(step, {"loss": 100.0 + step})
    logger.close()
    records = lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in records[:4]] == [10.0, 5.0, 10.0 / 3, 2.5]
    assert [r["loss"] for r in records[4:]] == [105.0, 106.0, 107.0, 108.0]
    assert not any("val_loss" in r for r in records)


def test_fresh_start_replaces_an_old_file(cfg, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    MetricsLogger(cfg, tmp_path, 0, start_step=0, total_steps=10).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_loss_curve_png_written_at_close_unless_disabled(cfg, tmp_path):
    logger = MetricsLogger(cfg, tmp_path / "a", 0, start_step=0, total_steps=4)
    for step in range(1, 5):
        logger.log(step, {"loss": 5.0 - step})
    logger.log_val(4, {"val_loss": 1.5})
    assert not (tmp_path / "a" / "loss_curve.png").exists()
    logger.close()
    png = (tmp_path / "a" / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    cfg.logging.plot = False
    logger = MetricsLogger(cfg, tmp_path / "b", 0, start_step=0, total_steps=4)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "b" / "loss_curve.png").exists()
    assert plot_loss_curve(tmp_path / "missing.jsonl", tmp_path / "x.png") is None


def test_log_val_requires_val_loss(cfg, tmp_path):
    with (
        MetricsLogger(cfg, tmp_path, 0, start_step=0, total_steps=4) as logger,
        pytest.raises(ValueError, match="val_loss"),
    ):
        logger.log_val(1, {"loss": 1.0})


def test_tensorboard_events_written(cfg, tmp_path):
    pytest.importorskip("tensorboard")
    cfg.logging.tensorboard = True
    with MetricsLogger(cfg, tmp_path, 0, start_step=0, total_steps=4) as logger:
        logger.log(1, {"loss": 1.0, "lr": 0.5})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_wandb_offline_resume_reuses_run_id(cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_MODE": "offline",
    }.items():
        monkeypatch.setenv(key, value)
    cfg.logging.wandb.mode = "offline"
    cfg.logging.wandb.tags = ["ci"]
    cfg.logging.plot = False
    first = MetricsLogger(cfg, tmp_path, 0, wandb_run_id=None, start_step=0, total_steps=4)
    run_id = first.wandb_run_id
    assert isinstance(run_id, str) and run_id
    first.log(1, {"loss": 2.0})
    first.close()
    second = MetricsLogger(cfg, tmp_path, 0, wandb_run_id=run_id, start_step=1, total_steps=4)
    assert second.wandb_run_id == run_id
    second.log(2, {"loss": 1.0})
    second.close()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # one folder per session, or one if both started within the same second (the name has the time)
    assert runs and all(r.name.endswith(f"-{run_id}") for r in runs)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_write_prints_on_rank_zero_only(cfg, tmp_path, capsys):
    MetricsLogger(cfg, tmp_path / "r1", 1, start_step=0, total_steps=4).write("from rank 1")
    with MetricsLogger(cfg, tmp_path / "r0", 0, start_step=0, total_steps=4) as logger:
        logger.write("saved checkpoint")
    out = capsys.readouterr().out
    assert "saved checkpoint" in out and "from rank 1" not in out
