"""Checkpoint bookkeeping without DeepSpeed: completeness, `latest`, the resume rules, pruning, RNG."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from llmtrain.errors import CheckpointError
from llmtrain.io import write_atomic
from llmtrain.train import checkpoint as ckpt
from llmtrain.train import manifest
from llmtrain.train.universal import needs_universal


def fake(run_dir, step: int, *, complete: bool = True):
    path = ckpt.step_dir(run_dir, step)
    path.mkdir(parents=True)
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    manifest.write_manifest(path, manifest.hash_files(path, manifest.list_files(path)))
    if complete:
        (path / ckpt.COMPLETE).write_text(f"{step}\n")
    return path


def test_latest_skips_incomplete_checkpoints(tmp_path):
    fake(tmp_path, 10)
    newest = fake(tmp_path, 20)
    fake(tmp_path, 30, complete=False)  # a save that died midway
    # `latest` names a checkpoint whose marker is gone (e.g. deleted by hand): fall back to scanning
    write_atomic(ckpt.checkpoints_dir(tmp_path) / ckpt.LATEST, "step_30")
    assert ckpt.latest_complete(tmp_path) == newest
    assert ckpt.find_checkpoint(tmp_path, "auto") == newest
    assert ckpt.resolve_checkpoint(tmp_path, None) == newest


def test_auto_without_checkpoints_starts_fresh(tmp_path):
    assert ckpt.find_checkpoint(tmp_path, "auto") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path, None)


def test_requested_checkpoint_must_exist_and_be_complete(tmp_path):
    fake(tmp_path, 5, complete=False)
    with pytest.raises(CheckpointError, match="step_7 does not exist"):
        ckpt.find_checkpoint(tmp_path, str(ckpt.step_dir(tmp_path, 7)))
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.find_checkpoint(tmp_path, str(ckpt.step_dir(tmp_path, 5)))
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.find_checkpoint(tmp_path, "step_5")  # a bare name means one of this run's checkpoints
    done = fake(tmp_path, 6)
    assert ckpt.find_checkpoint(tmp_path, "step_6") == done
    assert ckpt.find_checkpoint(tmp_path, str(tmp_path)) == done  # a run folder: its newest


def test_resume_none_refuses_a_run_that_has_checkpoints(tmp_path):
    assert ckpt.find_checkpoint(tmp_path, "none") is None
    fake(tmp_path, 4)
    with pytest.raises(CheckpointError, match="resume=none: .* already holds checkpoints"):
        ckpt.find_checkpoint(tmp_path, "none")


def test_prune_keeps_the_newest_complete_and_newer_partial(tmp_path):
    for step in (1, 2, 3, 4):
        fake(tmp_path, step)
    fake(tmp_path, 0, complete=False)
    fake(tmp_path, 5, complete=False)
    universal = ckpt.step_dir(tmp_path, 1).with_name("step_1" + ckpt.UNIVERSAL_SUFFIX)
    universal.mkdir()
    ckpt.prune(tmp_path, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4, 5]
    assert not universal.exists()


def test_prune_after_resuming_an_older_checkpoint_keeps_the_one_just_saved(tmp_path):
    """resume=step_2 of a run that reached step_6, then a save at step 4: `latest` says step_4."""
    for step in (2, 4, 6):
        fake(tmp_path, step)
    write_atomic(ckpt.checkpoints_dir(tmp_path) / ckpt.LATEST, "step_4")
    ckpt.prune(tmp_path, keep_last=1)
    assert ckpt.latest_complete(tmp_path) == ckpt.step_dir(tmp_path, 4)
    # step_6 belongs to the abandoned continuation: left alone, and overwritten when the run gets there
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 6]


def test_write_atomic_replaces_without_leftovers(tmp_path):
    target = tmp_path / "latest"
    write_atomic(target, "step_1")
    write_atomic(target, "step_2")
    assert target.read_text() == "step_2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(ckpt.RNGState().state_dict(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    ckpt.RNGState().load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == first


@pytest.mark.parametrize(
    ("saved", "now", "expected"),
    [
        ((2, 1), (2, 1), False),
        ((2, 1), (2, 2), False),  # stage 1 and 2 share their file layout
        ((2, 1), (1, 1), True),
        ((2, 3), (4, 3), True),
        ((2, 2), (2, 3), True),
        ((2, 0), (1, 0), False),  # ZeRO-0 files hold the whole state
    ],
)
def test_when_a_resume_goes_through_the_universal_format(tmp_path, saved, now, expected):
    state = {"world_size": saved[0], "zero_stage": saved[1]}
    assert needs_universal(state, now[0], now[1], tmp_path / "step_3") is expected


def test_zero0_cannot_change_stage(tmp_path):
    with pytest.raises(CheckpointError, match="only between ZeRO stages 1-3"):
        needs_universal({"world_size": 2, "zero_stage": 0}, 2, 1, tmp_path / "step_3")
