"""`train.init_from=<our checkpoint or run folder>`: continued pretraining from the session's checkpoint,
with a new mixture, schedule and optimizer, and the refusals of a source that does not fit."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from llmtrain.cli import run as cli_run
from llmtrain.config import load_config
from llmtrain.train.metrics import read_metrics

# a new mixture (books weighted up), a new schedule and optimizer settings, one logged step
CONTINUE = [
    "train.max_steps=1",
    "train.val_every=0",
    "checkpoint.at_end=false",
    "logging.every_steps=1",
    "schedule=constant",
    "schedule.warmup_steps=0",
    "optim.lr=1e-3",
    "optim.weight_decay=0.0",
    "run.seed=99",
]


@pytest.fixture
def env():
    """The trainer gives this process the env of a world of one; put it back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _source(trained) -> Path:
    return load_config(trained).run_dir


def _mixture(prepared_data) -> str:
    cfg = load_config(prepared_data.overrides)
    books, web = cfg.data.sources
    return (
        f"data.sources=[{{name:books,path:'{books.path}',format:txt,weight:3.0}},"
        f"{{name:web,path:'{web.path}',format:jsonl,text_field:text,weight:1.0}}]"
    )


def _first_batch_loss(cfg, model) -> float:
    from llmtrain.data.batch import batch_to_device
    from llmtrain.data.loader import build_train_loader

    loader = build_train_loader(cfg, 0, 1)
    inputs, targets, doc_ids = batch_to_device(loader.next_batch(), torch.device("cpu"), cfg.model.doc_mask)
    with torch.no_grad():
        return float(model(inputs, targets, doc_ids))


@pytest.mark.parametrize("zero", ["zero1", pytest.param("zero3", marks=pytest.mark.slow)])
def test_continued_run_starts_from_the_checkpoints_weights(trained, prepared_data, tmp_path, env, zero):
    """The continued run's first logged loss (before its first update) is the source model's loss on
    that run's first batch: the weights came over exactly, into a ZeRO-1 or a partitioned ZeRO-3 build."""
    from llmtrain.inference import load_checkpoint_model
    from llmtrain.train.trainer import main

    source = _source(trained)  # a run folder: its newest complete checkpoint
    run_dir = tmp_path / "continued"
    overrides = [*trained, *CONTINUE, _mixture(prepared_data), f"deepspeed={zero}"]
    overrides += [f"run.dir={run_dir}", f"train.init_from={source}"]
    assert main(load_config(overrides)) == 0
    first = read_metrics(run_dir / "metrics.jsonl")[0]
    assert first["step"] == 1
    model = load_checkpoint_model(load_config(trained), None, device=torch.device("cpu")).model
    expected = _first_batch_loss(load_config(overrides), model)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    fresh = load_config([*overrides, "train.init_from=null", f"model.vocab_size={prepared_data.vocab_size}"])
    from llmtrain.model import build_model

    torch.manual_seed(0)
    assert expected < _first_batch_loss(fresh, build_model(fresh.model)) - 0.05  # trained, not random


def _copy_source(trained, tmp_path) -> Path:
    copy = tmp_path / "source"
    shutil.copytree(_source(trained), copy)
    return copy


def _train_error(args: list[str], capsys) -> str:
    assert cli_run("train", args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_corrupt_source_is_refused_before_anything_in_it_is_unpickled(trained, tmp_path, env, capsys):
    source = _copy_source(trained, tmp_path)
    step = source / "checkpoints" / "step_6"
    target = next(step.glob("*model_states.pt"))
    marker = tmp_path / "unpickled"

    class Trap:  # unpickling this creates `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Trap())
    size = target.stat().st_size
    target.write_bytes(payload + b"\0" * (size - len(payload)))  # same size: only the checksum tells
    run_dir = tmp_path / "continued"
    err = _train_error([*trained, *CONTINUE, f"run.dir={run_dir}", f"train.init_from={step}"], capsys)
    assert f"train.init_from={step}" in err and "checksum mismatch" in err and target.name in err
    assert not marker.exists()
    assert not (run_dir / "config.yaml").exists()


def test_a_source_of_another_shape_or_tokenizer_is_one_line_naming_what_differs(
    trained, tmp_path, env, capsys
):
    from llmtrain.train import manifest

    source = _source(trained)
    base = [*trained, *CONTINUE, f"run.dir={tmp_path / 'continued'}", f"train.init_from={source}"]
    err = _train_error([*base, "model.n_layers=3"], capsys)
    assert f"train.init_from={source}: model.n_layers is 2 there but 3 in this run's config" in err

    # the same checkpoint, recorded as trained with another tokenizer (its manifest updated to match)
    copy = _copy_source(trained, tmp_path)
    step = copy / "checkpoints" / "step_6"
    state = json.loads((step / "llmtrain_state.json").read_text())
    state["run"]["tokenizer_hash"] = "0" * 64
    (step / "llmtrain_state.json").write_text(json.dumps(state))
    entries = json.loads((step / manifest.MANIFEST).read_text())["files"]
    entries.update(manifest.hash_files(step, ["llmtrain_state.json"]))
    manifest.write_manifest(step, entries)
    err = _train_error([*base[:-1], f"train.init_from={copy}"], capsys)
    assert "trained with another tokenizer (hash 000000000000)" in err


def test_missing_or_incomplete_sources_and_a_mismatched_init_optimizer_are_one_line(
    trained, tmp_path, env, capsys
):
    base = [*trained, *CONTINUE, f"run.dir={tmp_path / 'continued'}"]
    err = _train_error([*base, f"train.init_from={tmp_path / 'nothing'}"], capsys)
    assert f"train.init_from={tmp_path / 'nothing'}: no such folder" in err
    copy = _copy_source(trained, tmp_path)
    step = copy / "checkpoints" / "step_6"
    (step / "COMPLETE").unlink()
    err = _train_error([*base, f"train.init_from={step}"], capsys)
    assert "is incomplete (no COMPLETE marker)" in err
    err = _train_error([*base, f"train.init_from={copy}"], capsys)
    assert f"no complete checkpoint under {copy / 'checkpoints'}" in err
    err = _train_error([*base, f"train.init_from={tmp_path}"], capsys)
    assert "neither a Hugging Face folder" in err
    err = _train_error(
        [*base, f"train.init_from={_source(trained)}", "train.init_optimizer=true", "deepspeed=zero2"], capsys
    )
    assert "deepspeed.zero_stage is 1 there but 2 here" in err


def test_init_optimizer_carries_the_adam_moments_over(trained, tmp_path, env):
    """One step from the same weights on the same batch: a fresh AdamW moves every weight by lr (its
    first step is lr * sign(grad)); with the source's moments most weights move by something else."""
    from llmtrain.inference import load_weights
    from llmtrain.train.trainer import main

    source = _source(trained)
    before = load_weights(source / "checkpoints" / "step_6")["blocks.0.mlp.up.weight"]
    moved = {}
    for carry in (False, True):
        run_dir = tmp_path / f"carry_{carry}"
        overrides = [*trained, *CONTINUE, "checkpoint.at_end=true", f"run.dir={run_dir}"]
        overrides += [f"train.init_from={source}", f"train.init_optimizer={str(carry).lower()}"]
        assert main(load_config(overrides)) == 0
        after = load_weights(run_dir / "checkpoints" / "step_1")["blocks.0.mlp.up.weight"]
        at_lr = ((after - before).abs() - 1e-3).abs() < 1e-5  # optim.lr=1e-3, no weight decay
        moved[carry] = float(at_lr.float().mean())
    assert moved[False] > 0.99 and moved[True] < 0.5, moved
