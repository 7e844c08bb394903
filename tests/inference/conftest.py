"""A checkpoint trained once per test session, shared by every eval / generate / export / chat test."""

from __future__ import annotations

import os

import pytest

from llmtrain.config import load_config

TRAIN = [
    "debug=cpu",
    "model=tiny",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.max_steps=6",
    "train.val_every=6",
    "train.val_batches=2",
    "checkpoint.every_steps=6",
    "logging.every_steps=3",
    "logging.progress=false",
    "optim.lr=3e-3",
    "schedule.warmup_steps=1",
]


@pytest.fixture(scope="session")
def trained(prepared_data, tmp_path_factory):
    """Hydra overrides of one short run (tiny model, 6 steps, a checkpoint at step 6) over the
    session's `prepared_data`; the trainer sets the env of a world of one, restored afterwards.
    Read its checkpoint, never write into its run folder."""
    from llmtrain.train.trainer import main

    saved = dict(os.environ)
    overrides = [*prepared_data.overrides, *TRAIN, f"run.dir={tmp_path_factory.mktemp('inference') / 'run'}"]
    try:
        assert main(load_config(overrides)) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return overrides
