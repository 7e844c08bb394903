"""`python -m llmtrain.preflight WORLD [overrides...]`: the launcher's check before any rank starts.

Composes the config exactly as every rank will and checks what needs the world size (the batch
layout, with the global batch a resumed run keeps) and the checkpoint `resume=` names, so a
misspelled key, an inconsistent batch or a missing checkpoint fails in a second, naming it, instead
of on every rank after the launch. (The checkpoint's checksums are verified by the ranks, in parallel.)
"""

from __future__ import annotations

import sys

from llmtrain.app import split_args
from llmtrain.config import batch_layout, load_config
from llmtrain.errors import UserError
from llmtrain.train.checkpoint import find_checkpoint, read_state


def preflight(world_size: int, argv: list[str]) -> str:
    """One line describing the run's layout; raises UserError on a bad config."""
    config_dir, overrides, _ = split_args(argv)
    cfg = load_config(overrides, config_dir=config_dir)
    resumed = ""
    checkpoint = find_checkpoint(cfg.run_dir, cfg.resume)  # a missing or incomplete path fails here
    if checkpoint is not None:
        saved = read_state(checkpoint).get("run") or {}
        if cfg.train.global_batch_size is None and saved.get("global_batch_size"):
            # The trainer keeps the run's global batch; it must still divide into this world.
            cfg.train.global_batch_size = int(saved["global_batch_size"])
        resumed = f", resuming {checkpoint}"
    glob, accum = batch_layout(cfg, world_size)
    return (
        f"run {cfg.run_dir}: global batch {glob} = micro {cfg.train.micro_batch_size} "
        f"x accumulation {accum} x world {world_size}{resumed}"
    )


def main(argv: list[str]) -> int:
    try:
        print(f"pretrain.sh: {preflight(int(argv[0]), argv[1:])}", file=sys.stderr)
    except UserError as err:
        print(f"pretrain.sh: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
