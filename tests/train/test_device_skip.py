"""Training with clipping and the non-finite skip decided on the device (train.step_on_device): the
same updates as DeepSpeed's own clipping, and a non-finite step dropped and reported, with the guard's
verdict taken at the next logging or checkpoint step instead of a host read every step."""

from __future__ import annotations

import itertools

import pytest
import torch
from trainer_runs import TINY_RUN, train

from llmtrain.cli import run as cli_run
from llmtrain.config import load_config
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.metrics import read_metrics

BF16_ZERO1 = ["deepspeed=zero1", "train.precision=bf16"]  # the GPU default, here on the CPU
FP32_ZERO0 = ["deepspeed=zero0", "train.precision=fp32"]


@pytest.fixture(scope="module")
def overrides(prepared_data, tmp_path_factory, restore_env):
    root = tmp_path_factory.mktemp("device_skip")
    base = [
        *prepared_data.overrides,
        *TINY_RUN,
        "train.val_every=0",
        "logging.plot=false",
        "train.grad_clip=0.5",
    ]
    return lambda name, *extra: [*base, f"run.dir={root / name}", *extra]


@pytest.fixture
def poison_step(monkeypatch):
    """`poison_step(n)`: optimizer step n's first micro-batch (accumulation 2) gets a NaN loss."""
    from llmtrain.distributed.backend import DeepSpeedBackend

    def arm(step: int) -> None:
        calls = itertools.count()
        backward = DeepSpeedBackend.backward

        def poisoned(self, loss):
            if next(calls) == (step - 1) * 2:
                loss = loss * float("nan")
            backward(self, loss)

        monkeypatch.setattr(DeepSpeedBackend, "backward", poisoned)

    return arm


def records(ov: list[str]) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(load_config(ov).run_dir / "metrics.jsonl") if "lr" in r}


def _final_weights(ov: list[str]) -> dict:
    from llmtrain.distributed.backend import consolidated_state_dict

    return consolidated_state_dict(ckpt.step_dir(load_config(ov).run_dir, 4))


@pytest.mark.parametrize(
    "setting, rel",
    [pytest.param(FP32_ZERO0, 1e-6, id="zero0-fp32"), pytest.param(BF16_ZERO1, 2e-3, id="zero1-bf16")],
)
def test_clipped_training_matches_deepspeeds_own_clipping(overrides, setting, rel):
    """The norms are 0.94, 1.08, 1.41, 1.10: a clip of 1.0 leaves step 1 alone and scales the others
    by different factors, which Adam's moments do not cancel (a factor common to every step they would)."""
    name = "-".join(s.split("=")[1] for s in setting)
    got, weights = {}, {}
    for on_device in (True, False):
        ov = overrides(
            f"clip-{name}-{on_device}", *setting, "train.grad_clip=1.0", f"train.step_on_device={on_device}"
        )
        assert train(ov) == 0
        got[on_device], weights[on_device] = records(ov), _final_weights(ov)
    device, host = got[True], got[False]
    assert sorted(device) == sorted(host) == [1, 2, 3, 4]
    assert host[1]["grad_norm"] < 1.0 < min(host[s]["grad_norm"] for s in (2, 3, 4))
    for step in host:
        assert device[step]["loss"] == pytest.approx(host[step]["loss"], rel=rel), step
        assert device[step]["grad_norm"] == pytest.approx(host[step]["grad_norm"], rel=10 * rel), step
    for name, value in weights[False].items():
        torch.testing.assert_close(
            weights[True][name], value, rtol=10 * rel, atol=10 * rel * value.abs().max().item()
        )


def test_a_skipped_step_is_reported_and_left_out_of_the_interval_loss(overrides, monkeypatch, capsys):
    """Step 2 poisoned; logged every step, then every 3 steps (the same training either way)."""
    from llmtrain import faults

    got = {}
    for every in (1, 3):
        monkeypatch.setenv(faults.ENV, "loss@2:nan")
        monkeypatch.setattr(faults, "_plan", None)
        ov = overrides(
            f"skip{every}",
            *BF16_ZERO1,
            "train.max_steps=6",
            f"logging.every_steps={every}",
            "checkpoint.every_steps=0",
        )
        assert train(ov) == 0
        err = capsys.readouterr().err
        assert "clipping and non-finite skips: on the device" in err
        assert err.count("llmtrain train: step 2: non-finite gradient norm, update skipped") == 1
        got[every] = records(ov)
    monkeypatch.setattr(faults, "_plan", None)
    each, deferred = got[1], got[3]
    assert (
        sorted(deferred) == [3, 6] and deferred[3]["skipped_steps"] == 1 and deferred[6]["skipped_steps"] == 1
    )
    assert each[2]["loss"] is None
    # the interval's mean over its applied updates (2 micro-batches each): steps 1 and 3, not step 2
    assert deferred[3]["loss"] == pytest.approx((each[1]["loss"] + each[3]["loss"]) / 2, rel=1e-6)
    assert deferred[6]["loss"] == pytest.approx(sum(each[s]["loss"] for s in (4, 5, 6)) / 3, rel=1e-6)


@pytest.mark.parametrize(
    "first, then", [(False, True), (True, False)], ids=["host-then-device", "device-then-host"]
)
def test_a_resume_across_the_setting_clips_once(overrides, first, then):
    """ZeRO's optimizer checkpoint carries the clip it was saved with, and DeepSpeed's load restores
    it: a run resumed with the other train.step_on_device would clip twice, or not at all."""
    from llmtrain.distributed import runtime
    from llmtrain.train.trainer import Trainer

    common = [*BF16_ZERO1, "train.grad_clip=1.0", "checkpoint.every_steps=2"]
    ov = overrides(f"resume-{first}", *common, "train.max_steps=2", f"train.step_on_device={first}")
    assert train(ov) == 0
    cfg = load_config(
        overrides(f"resume-{first}", *common, "train.max_steps=4", f"train.step_on_device={then}")
    )
    trainer = Trainer(cfg, runtime.init_distributed(timeout_s=cfg.train.collective_timeout_s))
    assert trainer.start_step == 2
    assert trainer.backend.engine.optimizer.clip_grad == (0.0 if then else 1.0)
    assert trainer.fit() == 0


def test_guard_stop_names_the_skipped_step_at_the_next_logging_step(overrides, poison_step, capsys):
    poison_step(2)
    ov = overrides(
        "stop",
        *BF16_ZERO1,
        "guard.nonfinite=stop",
        "train.max_steps=6",
        "logging.every_steps=3",
        "checkpoint.every_steps=0",
    )
    assert cli_run("train", ov) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "llmtrain train: error: step 2: non-finite gradient norm, update skipped; "
        "stopping (guard.nonfinite=stop), nothing saved"
    )
    run_dir = load_config(ov).run_dir
    assert records(ov) == {}  # the verdict came at step 3, before its record
    assert not ckpt.list_checkpoints(run_dir)


def test_a_checkpoint_step_settles_the_skips_first(overrides, poison_step):
    """checkpoint.every_steps=2 falls on the poisoned step 2: the save waits for step 3, as on the host path."""
    poison_step(2)
    ov = overrides("save", *BF16_ZERO1, "logging.every_steps=4", "checkpoint.every_steps=2")
    assert train(ov) == 0
    run_dir = load_config(ov).run_dir
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [3, 4]
    assert ckpt.read_state(ckpt.step_dir(run_dir, 3))["guard"]["skipped_total"] == 1
