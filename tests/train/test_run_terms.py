"""What a run keeps across resumes: decided from the checkpoint, not from the new command line."""

from __future__ import annotations

import pytest

from llmtrain.config import Config
from llmtrain.errors import CheckpointError
from llmtrain.train.run_terms import resolve_run_terms

DATA = {"books": {"shards": 3, "tokens": 1000, "digest": "ab"}}


def config(**train) -> Config:
    cfg = Config()
    cfg.train.micro_batch_size = 4
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def resolve(cfg: Config, saved=None, *, data=DATA, tokenizer_hash="t1", world_size=2):
    return resolve_run_terms(
        cfg,
        tokenizer_hash=tokenizer_hash,
        vocab_size=512,
        data=data,
        world_size=world_size,
        saved=saved,
        checkpoint=None,
    )


def first_run_state(**train) -> dict:
    terms, _ = resolve(config(**train))
    return {"step": 500, "world_size": 2, "run": terms.state_dict()}


def test_a_fresh_run_fixes_its_horizon_and_global_batch():
    cfg = config(max_steps=1000)
    terms, notes = resolve(cfg)
    assert (terms.lr_horizon, terms.global_batch_size, notes) == (1000, 8, [])
    assert cfg.schedule.total_steps == 1000


def test_extending_max_steps_keeps_the_horizon_and_says_what_the_lr_does():
    cfg = config(max_steps=2000)
    terms, notes = resolve(cfg, first_run_state(max_steps=1000))
    assert terms.lr_horizon == 1000 and cfg.schedule.total_steps == 1000
    assert len(notes) == 1 and "runs past the learning-rate horizon 1000" in notes[0] and "floor" in notes[0]


def test_an_explicit_total_steps_moves_the_horizon_with_a_note():
    cfg = config(max_steps=2000)
    cfg.schedule.total_steps = 2000
    terms, notes = resolve(cfg, first_run_state(max_steps=1000))
    assert terms.lr_horizon == 2000
    assert any("replaces the horizon 1000" in n for n in notes)


def test_the_global_batch_is_kept_on_another_world_size():
    cfg = config(max_steps=1000)
    terms, _ = resolve(cfg, first_run_state(max_steps=1000), world_size=1)
    assert terms.global_batch_size == 8 and cfg.train.global_batch_size == 8


def test_another_tokenizer_or_changed_shards_are_refused():
    saved = first_run_state(max_steps=1000)
    with pytest.raises(CheckpointError, match="saved with tokenizer t1, but .* has t2"):
        resolve(config(max_steps=1000), saved, tokenizer_hash="t2")
    changed = {"books": {"shards": 3, "tokens": 1001, "digest": "cd"}}
    with pytest.raises(
        CheckpointError, match=r"shards .* changed .*books: 3 shards / 1000 tokens.*resume_allow_data_change"
    ):
        resolve(config(max_steps=1000), saved, data=changed)
    cfg = config(max_steps=1000)
    cfg.resume_allow_data_change = True
    _, notes = resolve(cfg, saved, data=changed)
    assert any("shards changed" in n for n in notes)


def test_a_new_seed_on_the_command_line_is_reported_and_ignored():
    cfg = config(max_steps=1000)
    cfg.run.seed = 99
    terms, notes = resolve(cfg, first_run_state(max_steps=1000))
    assert terms.seed == Config().run.seed and any("run.seed=99 ignored" in n for n in notes)


def test_the_global_batch_is_written_back_into_the_config():
    """config.yaml of a run records the batch it was fixed to, not `null`."""
    cfg = config(max_steps=10)
    resolve(cfg, world_size=2)
    assert cfg.train.global_batch_size == 8
