"""Sharded checkpoints that count only when complete, and the rules for finding one to resume.

Layout of `<run_dir>/checkpoints/`:

    step_<N>/                      DeepSpeed's files (mp_rank_*, zero_pp_rank_*) for tag step_<N>
        rng_rank<RRRRR>.pt         python / numpy / torch RNG states of rank R (each rank writes its own)
        llmtrain_state.json        step, next global sample, world size, ZeRO stage, tokenizer hash,
                                   wandb run id (rank 0, after every rank finished writing)
        config.yaml                the resolved config of the run that wrote it
        COMPLETE                   written last by rank 0: only now does the checkpoint count
    step_<N>_universal/            DeepSpeed universal form of step_<N>, made when resuming on another
                                   world size (or by `llmtrain checkpoint`); removed with step_<N>
    latest                         "step_<N>": the newest complete checkpoint, replaced atomically

DeepSpeed's own `latest` file is never written (`save_latest=False`): DeepSpeed writes it before
the ranks agree the save finished, so it can point at a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.errors import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
STATE_FILE = "llmtrain_state.json"
CONFIG_FILE = "config.yaml"
UNIVERSAL_SUFFIX = "_universal"
_STEP_RE = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------- locating checkpoints


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step_<N>` folder, complete or not, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names if complete, else the newest complete one found by scanning."""
    latest = checkpoints_dir(run_dir) / LATEST
    if latest.is_file():
        named = checkpoints_dir(run_dir) / latest.read_text().strip()
        if is_complete(named):
            return named
    complete = [path for _, path in list_checkpoints(run_dir) if is_complete(path)]
    return complete[-1] if complete else None


def _as_checkpoint(path: Path, what: str) -> Path:
    """A checkpoint folder from a path that names one, a `checkpoints/` folder, or a run folder."""
    if not path.exists():
        raise CheckpointError(f"{what}: checkpoint {path} does not exist")
    if (path / STATE_FILE).is_file() or _STEP_RE.match(path.name) or path.name.endswith(UNIVERSAL_SUFFIX):
        if not is_complete(path):
            raise CheckpointError(f"{what}: checkpoint {path} is incomplete (no {COMPLETE} marker)")
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    found = latest_complete(run_dir)
    if found is None:
        raise CheckpointError(f"{what}: no complete checkpoint under {path}")
    return found


def find_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """What `resume` asks for: a checkpoint folder, or None for a fresh start.

    auto: newest complete checkpoint of the run, else fresh. none: fresh, and refused when the run
    already has complete checkpoints, since the new run's checkpoints would mix with the old ones.
    Anything else is a path (or `step_<N>` of this run); missing or incomplete is an error.
    """
    if resume == "auto":
        return latest_complete(run_dir)
    if resume == "none":
        existing = latest_complete(run_dir)
        if existing is not None:
            raise CheckpointError(
                f"resume=none: {run_dir} already holds checkpoints (newest {existing.name}); use resume=auto "
                "to continue it, or another run.name / delete the folder to start over"
            )
        return None
    path = Path(resume).expanduser()
    if not path.exists() and not path.is_absolute() and len(path.parts) == 1:
        path = checkpoints_dir(run_dir) / resume
    return _as_checkpoint(path, f"resume={resume}")


def resolve_checkpoint(run_dir: str | Path, which: str | None) -> Path:
    """The checkpoint for eval / generate / export: `which` (a path) or the run's newest complete one."""
    if which:
        return find_checkpoint(run_dir, which)  # type: ignore[return-value]
    found = latest_complete(run_dir)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {checkpoints_dir(run_dir)}; train first")
    return found


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a llmtrain checkpoint") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt ({err})") from None


# ---------------------------------------------------------------- RNG state (one file per rank)


def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG's state as tensors, so `torch.load(weights_only=True)` reads it back."""
    py_version, py_state, py_gauss = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": torch.tensor([py_version, *py_state], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": torch.tensor([pos, has_gauss, gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    assert py_gauss is None and name == "MT19937"
    if torch.cuda.is_available():
        # This rank's device only: a resume may see another number of GPUs per node.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    py = state["python"].tolist()
    random.setstate((py[0], tuple(py[1:]), None))
    pos, has_gauss, gauss = state["numpy_rest"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng_rank{rank:05d}.pt"


def rng_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("rng_rank*.pt"))


# ---------------------------------------------------------------- atomic small files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------- save / load


def save(
    engine, run_dir: str | Path, step: int, state: dict[str, Any], *, config_yaml: str, keep_last: int
) -> dict[str, float]:
    """Collective: every rank writes its shards and RNG state; rank 0 then marks it complete.

    Returns {"ckpt_s": seconds training was blocked, "ckpt_gb": size (rank 0 only, else 0)}.
    """
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY

    start = time.perf_counter()
    rank = dist.get_rank()
    path = step_dir(run_dir, step)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # leftover of an interrupted save, or a run resumed from an older step
            shutil.rmtree(path)
            shutil.rmtree(path.with_name(path.name + UNIVERSAL_SUFFIX), ignore_errors=True)
    dist.barrier()
    # ds_to_universal refuses a checkpoint without this key; plain data parallelism needs no patterns.
    client_state = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.4}, "llmtrain": state}
    engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), _rng_file(path, rank))
    dist.barrier()
    size_gb = 0.0
    if rank == 0:
        write_atomic(path / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
        write_atomic(path / CONFIG_FILE, config_yaml)
        write_atomic(path / COMPLETE, f"{step}\n")
        write_atomic(checkpoints_dir(run_dir) / LATEST, path.name)
        prune(run_dir, keep_last)
        size_gb = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e9
    # Returning means complete on every rank: a rank that exits next cannot outrun the marker.
    dist.barrier()
    return {"ckpt_s": time.perf_counter() - start, "ckpt_gb": size_gb}


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Keep the `keep_last` newest complete checkpoints up to the current one (the one `latest`
    names); drop incomplete ones older than it.

    Checkpoints past the current one are left alone: they exist when a run resumed from an older
    checkpoint, and counting them would delete the checkpoint just saved.
    """
    current = latest_complete(run_dir)
    match = _STEP_RE.match(current.name) if current is not None else None
    if match is None:
        return
    entries = [(step, path) for step, path in list_checkpoints(run_dir) if step <= int(match.group(1))]
    keep = set([step for step, path in entries if is_complete(path)][-keep_last:])
    for step, path in entries:
        if step in keep:
            continue
        shutil.rmtree(path.with_name(path.name + UNIVERSAL_SUFFIX), ignore_errors=True)
        # The marker goes first: a crash mid-delete leaves an incomplete folder, never a broken "complete" one.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


def load(engine, checkpoint: Path, *, restore_rng: bool) -> None:
    """Collective: load DeepSpeed's state (model, optimizer, step counters) and this rank's RNGs."""
    import torch.distributed as dist

    load_path, _ = engine.load_checkpoint(
        str(checkpoint.parent),
        tag=checkpoint.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_strict=True,
    )
    if load_path is None:
        raise CheckpointError(f"{checkpoint}: DeepSpeed found nothing to load")
    rng = _rng_file(checkpoint, dist.get_rank())
    if restore_rng and rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))


def load_model_state(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """fp32 consolidated weights of a checkpoint saved with any ZeRO stage, on the CPU."""
    path = Path(checkpoint_dir)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    if any(path.glob("*_optim_states.pt")):
        # DeepSpeed narrates on stdout (from its import on), where `llmtrain generate` writes samples.
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        # ZeRO-0 keeps the whole module in mp_rank_00 (in the training dtype).
        files = sorted(path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{path}: no DeepSpeed model states found")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {name: tensor.detach().float().contiguous() for name, tensor in state.items()}
