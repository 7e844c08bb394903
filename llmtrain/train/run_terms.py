"""What a run fixes at its start, saved in every checkpoint and checked on every resume.

Recomputing these from the current command line on a resume silently changes the run: a larger
`train.max_steps` moved the learning-rate horizon (the cosine jumped back up), another world size
changed the global batch. So they are decided once, from the first run's config, and a resume keeps
them unless the user asks for a change explicitly, in which case we say what changes.

    tokenizer_hash, vocab_size  a different tokenizer is refused (the shards and the weights disagree)
    data                        per-source fingerprint of the shards; a change is refused unless
                                `resume_allow_data_change=true`
    global_batch_size           kept unless `train.global_batch_size` is given (then a warning)
    lr_horizon                  kept unless `schedule.total_steps` is given
    seed, seq_len               kept; a different value on the command line is reported and ignored
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmtrain.config import Config
from llmtrain.errors import CheckpointError
from llmtrain.train.schedule import lr_at


@dataclass
class RunTerms:
    tokenizer_hash: str
    vocab_size: int
    global_batch_size: int
    lr_horizon: int
    seed: int
    seq_len: int
    data: dict[str, dict]

    def state_dict(self) -> dict[str, Any]:
        """Saved under "run"; read back by `resolve_run_terms`, which decides what a resume keeps."""
        return asdict(self)


def _saved_terms(saved: dict[str, Any]) -> dict[str, Any]:
    """The terms of a checkpoint; older checkpoints kept some of them at the top level."""
    terms = dict(saved.get("run") or {})
    for key in ("tokenizer_hash", "global_batch_size", "seed"):
        if key not in terms and key in saved:
            terms[key] = saved[key]
    return terms


def resolve_run_terms(
    cfg: Config,
    *,
    tokenizer_hash: str,
    vocab_size: int,
    data: dict[str, dict],
    world_size: int,
    saved: dict[str, Any] | None,
    checkpoint: Path | None,
) -> tuple[RunTerms, list[str]]:
    """The terms in force for this run, and the notes to print (rank 0) about what a resume changes.

    Writes the kept values into `cfg` (global batch, schedule horizon, seed, seq_len), so everything
    built from it afterwards sees the run's terms. Raises CheckpointError for a refused change.
    """
    notes: list[str] = []
    if saved is not None:
        _keep_saved_terms(cfg, saved, checkpoint, tokenizer_hash=tokenizer_hash, data=data, notes=notes)
    else:
        cfg.schedule.total_steps = cfg.schedule.total_steps or cfg.train.max_steps
    # Written back, so config.yaml records the batch the run was fixed to, whatever the world size.
    cfg.train.global_batch_size = cfg.train.global_batch_size or cfg.train.micro_batch_size * world_size
    terms = RunTerms(
        tokenizer_hash=tokenizer_hash,
        vocab_size=vocab_size,
        global_batch_size=cfg.train.global_batch_size,
        lr_horizon=cfg.schedule.total_steps,
        seed=cfg.run.seed,
        seq_len=cfg.train.seq_len,
        data=data,
    )
    return terms, notes


def _keep_saved_terms(
    cfg: Config,
    saved: dict[str, Any],
    checkpoint: Path | None,
    *,
    tokenizer_hash: str,
    data: dict,
    notes: list[str],
) -> None:
    """Refuse what must not change, and write the kept terms into `cfg`."""
    old = _saved_terms(saved)
    where = checkpoint or "the checkpoint"
    if old.get("tokenizer_hash") not in (None, tokenizer_hash):
        raise CheckpointError(
            f"{where}: saved with tokenizer {old['tokenizer_hash']}, but {cfg.data_dir}/tokenizer.json "
            f"has {tokenizer_hash}; resume with the data folder the run was trained on"
        )
    old_data = old.get("data")
    if old_data is not None and old_data != data:
        changed = sorted(k for k in set(old_data) | set(data) if old_data.get(k) != data.get(k))
        detail = ", ".join(
            f"{k}: {_describe(old_data.get(k))} -> {_describe(data.get(k))}" for k in changed[:3]
        )
        if not cfg.resume_allow_data_change:
            raise CheckpointError(
                f"{where}: the shards in {cfg.data_dir} changed since this checkpoint ({detail}); the "
                "sample sequence would differ. Set resume_allow_data_change=true to resume anyway"
            )
        notes.append(f"the shards changed since the checkpoint ({detail}); resuming as asked")
    glob = old.get("global_batch_size")
    if cfg.train.global_batch_size is None:
        # Keep the run's global batch, so a resume on another world size sees the same samples.
        cfg.train.global_batch_size = glob
    elif glob is not None and cfg.train.global_batch_size != glob:
        warnings.warn(
            f"train.global_batch_size changed from {glob} to {cfg.train.global_batch_size}: "
            "the sample sequence continues, the step size differs",
            stacklevel=3,
        )
    _resolve_horizon(cfg, old.get("lr_horizon"), int(saved["step"]), notes)
    for key, current, section in (("seed", cfg.run.seed, "run"), ("seq_len", cfg.train.seq_len, "train")):
        if key in old and old[key] != current:
            notes.append(f"{section}.{key}={current} ignored: the run was started with {old[key]}")
            setattr(getattr(cfg, section), key, old[key])


def _resolve_horizon(cfg: Config, saved_horizon: int | None, step: int, notes: list[str]) -> int:
    """The learning-rate horizon in force: the checkpoint's, unless `schedule.total_steps` is given."""
    asked = cfg.schedule.total_steps
    if saved_horizon is None:  # a checkpoint from before horizons were saved
        horizon = asked or cfg.train.max_steps
    elif asked is None or asked == saved_horizon:
        horizon = saved_horizon
    else:
        horizon = asked
        before = _lr(cfg, step, saved_horizon)
        after = _lr(cfg, step, asked)
        notes.append(
            f"schedule.total_steps={asked} replaces the horizon {saved_horizon} of this run: the lr at step "
            f"{step} moves from {before:.3e} to {after:.3e}"
        )
    cfg.schedule.total_steps = horizon
    max_steps = cfg.train.max_steps
    if max_steps > horizon and cfg.schedule.name != "constant":
        floor = cfg.optim.lr * cfg.schedule.min_lr_ratio
        notes.append(
            f"train.max_steps={max_steps} runs past the learning-rate horizon {horizon}: from step {horizon} "
            f"on the lr stays at its floor {floor:.3e}; set schedule.total_steps={max_steps} to stretch "
            "the schedule instead"
        )
    return horizon


def _lr(cfg: Config, step: int, horizon: int) -> float:
    from dataclasses import replace

    return lr_at(
        step, base_lr=cfg.optim.lr, schedule=replace(cfg.schedule, total_steps=horizon), max_steps=horizon
    )


def _describe(entry: dict | None) -> str:
    if entry is None:
        return "absent"
    return f"{entry.get('shards')} shards / {entry.get('tokens')} tokens / {str(entry.get('digest'))[:8]}"
