"""Tiny single-process training runs shared by the trainer and trust tests (a world of one, in-process)."""

from __future__ import annotations

from llmtrain.config import load_config

# fp32 on CPU, 4 steps of accumulation 2, checkpoints every 2 steps: a run takes seconds.
TINY_RUN = [
    "debug=cpu",
    "model=tiny",
    "deepspeed=zero1",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",  # accumulation 2
    "train.max_steps=4",
    "checkpoint.every_steps=2",
    "logging.every_steps=1",
    "logging.progress=false",
    "optim.lr=3e-3",
    "schedule=constant",
    "schedule.warmup_steps=1",
]


def train(overrides: list[str]) -> int:
    from llmtrain.train.trainer import main

    return main(load_config(overrides))
