"""`llmtrain train` in this process (a world of one, no launcher): what a run writes, and resume rules."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from trainer_runs import TINY_RUN, train

from llmtrain.cli import run as cli_run
from llmtrain.config import load_config
from llmtrain.errors import CheckpointError, ConfigError, DataError
from llmtrain.train import checkpoint as ckpt
from llmtrain.train import manifest
from llmtrain.train.metrics import read_metrics

STEPS = 4
TRAIN = [
    *TINY_RUN,
    "train.val_every=2",
    "train.val_batches=2",
]


@pytest.fixture(scope="module")
def overrides(prepared_data, tmp_path_factory, restore_env):
    root = tmp_path_factory.mktemp("trainer")
    return lambda name, *extra: [*prepared_data.overrides, *TRAIN, f"run.dir={root / name}", *extra]


@pytest.fixture(scope="module")
def reference(overrides):
    """4 steps with wandb offline, validation and checkpoints every 2 steps."""
    ov = overrides("ref", "logging.wandb.mode=offline")
    assert train(ov) == 0
    return load_config(ov).run_dir


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_run_writes_metrics_validation_checkpoints_and_config(reference):
    records = read_metrics(reference / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for r in train_records:
        for key in (
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "tokens_per_s_per_device",
            "step_time_s",
            "data_wait_share",
            "memory_gb_rss",  # on CPU; memory_gb_cuda_peak on a GPU
        ):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        assert 0 <= r["data_wait_share"] < 1
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    for source in ("books", "web"):
        loss = val[-1][f"val/{source}/loss"]
        assert val[-1][f"val/{source}/ppl"] == pytest.approx(math.exp(loss))
        assert 0 < val[-1][f"val/{source}/bpb"] < loss / math.log(2)  # more than one byte per token
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert (reference / "loss_curve.png").stat().st_size > 0
    resolved = (reference / "config.yaml").read_text()
    assert "vocab_size: 512" in resolved and f"total_steps: {STEPS}" in resolved
    assert (reference / "checkpoints" / "latest").read_text() == "step_4"
    state = ckpt.read_state(ckpt.step_dir(reference, 4))
    assert state["step"] == 4 and state["world_size"] == 1 and state["loader"]["next_sample"] == 32
    assert state["metrics"]["wandb_run_id"]


def test_resume_continues_bit_exact_in_the_same_wandb_run(reference, overrides):
    ov = overrides("resumed", "logging.wandb.mode=offline")
    run_dir = load_config(ov).run_dir
    shutil.copytree(reference, run_dir)
    assert train([*ov, f"resume={ckpt.step_dir(run_dir, 2)}"]) == 0
    expected, got = losses(reference), losses(run_dir)
    assert got == expected  # steps 1-2 kept from before the checkpoint, 3-4 recomputed bit for bit
    run_id = ckpt.read_state(ckpt.step_dir(reference, 4))["metrics"]["wandb_run_id"]
    assert ckpt.read_state(ckpt.step_dir(run_dir, 4))["metrics"]["wandb_run_id"] == run_id
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(run_id) for name in offline_runs)


def test_a_missing_checkpoint_is_a_one_line_error(overrides, tmp_path, capsys):
    missing = tmp_path / "nope" / "step_9"
    assert cli_run("train", [*overrides("missing"), f"resume={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"llmtrain train: error: resume={missing}: checkpoint {missing} does not exist"


def test_an_incomplete_checkpoint_is_refused(reference, overrides):
    ov = overrides("incomplete")
    run_dir = load_config(ov).run_dir
    shutil.copytree(reference, run_dir)
    (ckpt.step_dir(run_dir, 4) / ckpt.COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="step_4 is incomplete"):
        train([*ov, f"resume={ckpt.step_dir(run_dir, 4)}"])
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train([*ov, "resume=none"])


def test_tokenizer_change_on_resume_is_refused(reference, overrides):
    ov = overrides("tokenizer")
    run_dir = load_config(ov).run_dir
    shutil.copytree(reference, run_dir)
    folder = ckpt.step_dir(run_dir, 4)
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    state["run"]["tokenizer_hash"] = "0123456789ab"
    (folder / ckpt.STATE_FILE).write_text(json.dumps(state))
    # a checkpoint that verifies (its manifest rewritten), but of a run with another tokenizer
    manifest.write_manifest(folder, manifest.hash_files(folder, manifest.list_files(folder)))
    with pytest.raises(CheckpointError, match="saved with tokenizer 0123456789ab, but .*tokenizer.json has"):
        train(ov)


def test_missing_tokenizer_says_to_prepare(overrides, tmp_path):
    with pytest.raises(DataError, match="run `llmtrain prepare` first"):
        train([*overrides("nodata"), f"data.dir={tmp_path / 'empty'}"])


def test_consolidated_weights_and_universal_conversion(reference, overrides):
    import torch

    from llmtrain.inference import load_weights
    from llmtrain.model import build_model
    from llmtrain.train import universal

    weights = load_weights(ckpt.step_dir(reference, 4))
    cfg = load_config(overrides("ref"))
    cfg.model.vocab_size = 512
    model = build_model(cfg.model)
    assert weights.keys() == model.state_dict().keys()
    assert all(t.dtype == torch.float32 for t in weights.values())
    model.load_state_dict(weights)

    ov = overrides("universal")
    run_dir = load_config(ov).run_dir
    shutil.copytree(reference, run_dir)
    assert universal.main(load_config(ov)) == 0  # `llmtrain checkpoint`: the newest complete one
    out = ckpt.step_dir(run_dir, 4).with_name("step_4" + ckpt.UNIVERSAL_SUFFIX)
    assert ckpt.is_complete(out) and (out / ckpt.STATE_FILE).is_file() and (out / "zero").is_dir()
    # a resume through it on the same world size restores each rank's RNG (dropout) from here
    assert [p.name for p in out.glob("rng_rank*.pt")] == ["rng_rank00000.pt"]
    assert not (run_dir / "checkpoints" / "latest_universal").exists()


def test_time_based_checkpoints_keep_the_last_k(overrides):
    ov = overrides(
        "timed",
        "train.max_steps=3",
        "train.val_every=0",
        "checkpoint.every_steps=0",
        "checkpoint.every_minutes=1e-9",  # due at every logging interval (every step here)
        "checkpoint.at_end=false",
        "checkpoint.keep_last=2",
    )
    assert train(ov) == 0
    run_dir = load_config(ov).run_dir
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_3"


def test_validation_without_a_full_batch_is_refused_before_training(overrides):
    """64 windows of 128 tokens exceed each source's val split: nothing to validate on."""
    ov = overrides("noval", "train.seq_len=128", "train.micro_batch_size=64", "train.global_batch_size=64")
    with pytest.raises(ConfigError, match=r"train.val_every=2: the validation split of .* has no full batch"):
        train(ov)
    assert not (load_config(ov).run_dir / "metrics.jsonl").exists()


def test_auto_precision_is_resolved_said_and_recorded(overrides, capsys):
    from llmtrain.distributed import runtime

    ov = overrides("auto", "train.precision=auto", "train.max_steps=1", "train.val_every=0")
    assert train(ov) == 0
    expected, why = runtime.resolve_precision("auto")
    assert f"llmtrain train: precision {expected} ({why})" in capsys.readouterr().err
    assert f"precision: {expected}" in (load_config(ov).run_dir / "config.yaml").read_text()


def test_a_precision_the_device_lacks_is_a_config_error(overrides):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this device supports fp16")
    with pytest.raises(ConfigError, match=r"train.precision=fp16: not supported by this device \(cpu\)"):
        train([*overrides("fp16"), "train.precision=fp16"])


def test_muon_at_fp32_zero0_is_skipped_by_the_backends_own_check(overrides, monkeypatch, capsys):
    """Muon cannot skip on the device and DeepSpeed checks nothing at fp32 ZeRO-0: the backend reads
    the gradients' finiteness itself and drops the update (LLMTRAIN_FAULT makes step 2's loss NaN)."""
    from llmtrain import faults

    monkeypatch.setenv(faults.ENV, "loss@2:nan")
    monkeypatch.setattr(faults, "_plan", None)
    ov = overrides(
        "muon_zero0_nan", "optim=muon", "train.grad_clip=0", "deepspeed=zero0", "train.val_every=0"
    )
    assert train(ov) == 0
    monkeypatch.setattr(faults, "_plan", None)
    err = capsys.readouterr().err
    assert "clipping and non-finite skips: DeepSpeed's, on the host" in err
    assert "llmtrain train: step 2: non-finite gradient norm, update skipped" in err
    got = {r["step"]: r for r in read_metrics(load_config(ov).run_dir / "metrics.jsonl") if "lr" in r}
    assert got[2]["loss"] is None and got[2]["skipped_steps"] == 1
    assert all(math.isfinite(got[s]["loss"]) for s in (1, 3, 4)) and got[4]["skipped_steps"] == 1


def test_fp32_zero0_skips_non_finite_updates_and_stops_after_five(overrides):
    """The path where DeepSpeed checks nothing: the guard's own check skips each non-finite update
    (weights untouched) and stops the run, non-zero, after guard.max_consecutive_skips in a row."""
    from llmtrain.train.guard import GuardStop

    ov = overrides(
        "zero0nan",
        "deepspeed=zero0",
        "optim.lr=1e6",
        "schedule=cosine",
        "schedule.warmup_steps=0",
        "train.max_steps=12",
        "train.val_every=0",
        "checkpoint.every_steps=0",
    )
    with pytest.raises(GuardStop, match=r"step \d+: 5 consecutive steps with a non-finite gradient norm"):
        train(ov)
    run_dir = load_config(ov).run_dir
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "skipped_steps" in r]
    assert records[-1]["skipped_steps"] == 4 and records[-1]["loss"] is None  # the 5th stops before logging
    assert not ckpt.list_checkpoints(run_dir)  # stop saves nothing
