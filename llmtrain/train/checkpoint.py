"""Sharded checkpoints that count only when complete and verified, and the rules for finding one.

Layout of `<run_dir>/checkpoints/`:

    step_<N>/                      DeepSpeed's files (mp_rank_*, zero_pp_rank_*) for tag step_<N>
        rng_rank<RRRRR>.pt         every rank's RNG states (tensors only: read with weights_only=True)
        llmtrain_state.json        step, world size, ZeRO stage and the state of every stateful part
                                   (run terms, loader, metrics, guard), written by rank 0
        config.yaml                the resolved config of the run that wrote it
        MANIFEST.json              size and checksum of every file above (each rank hashed its own)
        COMPLETE                   written last by rank 0: only now does the checkpoint count
    step_<N>_universal/            DeepSpeed universal form of step_<N>, made when resuming on another
                                   world size (or by `llmtrain checkpoint`); removed with step_<N>
    latest                         "step_<N>": the newest complete checkpoint, replaced atomically

The manager sees only the training backend (which writes and reads the model and optimizer shards)
and stateful objects with `state_dict()` / `load_state_dict()`. Nothing in a folder is unpickled
before its manifest verifies; a folder without a manifest (made elsewhere) loads only with
`checkpoint.trust_unverified=true`.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llmtrain import faults
from llmtrain.errors import CheckpointError, UserError
from llmtrain.io import write_atomic
from llmtrain.train import manifest

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
STATE_FILE = "llmtrain_state.json"
CONFIG_FILE = "config.yaml"
UNIVERSAL_SUFFIX = "_universal"
_STEP_RE = re.compile(r"^step_(\d+)$")
_RANK_OF_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)0*(\d+)")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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


def _named_by_latest(run_dir: str | Path) -> Path | None:
    """The folder `latest` names, or None when it is missing or garbage (then we scan instead)."""
    latest = checkpoints_dir(run_dir) / LATEST
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return checkpoints_dir(run_dir) / name if _STEP_RE.match(name) else None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, newest first; the one `latest` names leads when it is complete."""
    found = [path for _, path in reversed(list_checkpoints(run_dir)) if is_complete(path)]
    named = _named_by_latest(run_dir)
    if named is not None and named in found:
        found.remove(named)
        found.insert(0, named)
    return found


def latest_complete(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names if complete, else the newest complete one found by scanning."""
    found = complete_checkpoints(run_dir)
    return found[0] if found else None


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


def explicit_checkpoint(run_dir: str | Path, resume: str) -> Path:
    """The folder a `resume=<path>` (or `step_<N>` of this run) names; missing or incomplete is an error."""
    path = Path(resume).expanduser()
    if not path.exists() and not path.is_absolute() and len(path.parts) == 1:
        path = checkpoints_dir(run_dir) / resume
    return _as_checkpoint(path, f"resume={resume}")


def find_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """What `resume` asks for, before verification: a checkpoint folder, or None for a fresh start.

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
    return explicit_checkpoint(run_dir, resume)


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a llmtrain checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: corrupt (no step)")
    return state


# ---------------------------------------------------------------- verification


def verify(checkpoint: Path, *, trust_unverified: bool, rank: int = 0, world_size: int = 1) -> None:
    """This rank's share of the manifest check (all of it in a world of one); CheckpointError naming
    the bad file. A folder without a manifest passes only when `trust_unverified`."""
    try:
        manifest.verify(checkpoint, rank=rank, world_size=world_size)
    except manifest.UnverifiedCheckpoint:
        if not trust_unverified:
            raise
        if rank == 0:
            warnings.warn(
                f"{checkpoint}: no {manifest.MANIFEST}; loading it unverified (checkpoint.trust_unverified=true)",
                stacklevel=2,
            )


def resolve_checkpoint(run_dir: str | Path, which: str | None, *, trust_unverified: bool = False) -> Path:
    """A verified checkpoint for eval / generate / export / conversion: `which` (a path, an error if
    it does not verify) or the run's newest complete one that verifies (older ones are tried, loudly).
    `auto` and `latest` mean the newest."""
    if which and which not in ("auto", "latest"):
        path = explicit_checkpoint(run_dir, which)
        verify(path, trust_unverified=trust_unverified)
        return path
    candidates = complete_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"no complete checkpoint in {checkpoints_dir(run_dir)}; train first")
    for path in candidates:
        try:
            verify(path, trust_unverified=trust_unverified)
            return path
        except CheckpointError as err:
            print(f"llmtrain: warning: skipping checkpoint {path.name}: {err}", file=sys.stderr)
    raise CheckpointError(f"no checkpoint in {checkpoints_dir(run_dir)} verifies (see the warnings above)")


# ---------------------------------------------------------------- RNG state (one file per rank)


class RNGState:
    """Python, numpy and torch (CPU and this rank's GPU) generators, as tensors, so
    `torch.load(weights_only=True)` reads them back."""

    def state_dict(self) -> dict[str, torch.Tensor]:
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

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        py = state["python"].tolist()
        random.setstate((py[0], tuple(py[1:]), None))
        pos, has_gauss, gauss = state["numpy_rest"].tolist()
        np.random.set_state(
            ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss)
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng_rank{rank:05d}.pt"


def rng_files(checkpoint: Path) -> list[Path]:
    return sorted(checkpoint.glob("rng_rank*.pt"))


def _writer_rank(relpath: str) -> int:
    """Which rank wrote (and so hashes) a file: the one in its name, else rank 0 (mp_rank_00, ours)."""
    match = _RANK_OF_FILE.search(Path(relpath).name)
    return int(match.group(1)) if match else 0


# ---------------------------------------------------------------- save / load


class CheckpointManager:
    """Saves and restores the backend's shards and the stateful parts of a run, collectively."""

    def __init__(self, run_dir: Path, backend, *, rank: int, world_size: int, keep_last: int):
        self.run_dir = Path(run_dir)
        self.backend = backend
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last

    def save(
        self, step: int, states: dict[str, Stateful], *, extra: dict[str, Any], config_yaml: str
    ) -> dict[str, float]:
        """Every rank writes its shards and RNG state and hashes what it wrote; rank 0 then writes
        the state, the manifest, COMPLETE and `latest`, in that order.

        Returns {"ckpt_s": seconds training was blocked, "ckpt_gb": size (rank 0 only, else 0)}.
        A full disk raises a UserError naming the folder on every rank, and the partial folder is
        removed: the previous checkpoint stays the newest complete one.
        """
        import torch.distributed as dist

        start = time.perf_counter()
        path = step_dir(self.run_dir, step)
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():  # leftover of an interrupted save, or a run resumed from an older step
                (path / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(path)
                shutil.rmtree(path.with_name(path.name + UNIVERSAL_SUFFIX), ignore_errors=True)
            path.mkdir()
        dist.barrier()
        error = None
        try:
            self.backend.save(path, {"llmtrain_step": step})
            torch.save(RNGState().state_dict(), rng_file(path, self.rank))
            dist.barrier()
            faults.maybe_fail("save_shards", step)
            if self.rank == 0:
                state = {"step": step, "world_size": self.world_size, **extra}
                state.update({name: obj.state_dict() for name, obj in states.items()})
                write_atomic(path / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
                write_atomic(path / CONFIG_FILE, config_yaml)
            dist.barrier()
            mine = [f for f in manifest.list_files(path) if _writer_rank(f) == self.rank % self.world_size]
            entries = manifest.hash_files(path, mine)
        except (OSError, RuntimeError, UserError) as err:
            error, entries = _describe_save_error(err, path), {}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (error, entries))
        errors = [e for e, _ in gathered if e]
        if errors:
            if self.rank == 0:
                shutil.rmtree(path, ignore_errors=True)
            dist.barrier()
            raise UserError(errors[0])
        size_gb = 0.0
        if self.rank == 0:
            merged = {name: entry for _, part in gathered for name, entry in part.items()}
            try:
                manifest.write_manifest(path, merged)
                faults.maybe_fail("save_manifest", step)
                write_atomic(path / COMPLETE, f"{step}\n")
                faults.maybe_fail("save_latest", step)
                write_atomic(checkpoints_dir(self.run_dir) / LATEST, path.name)
            except (OSError, UserError) as err:
                error = _describe_save_error(err, path)
                (path / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(path, ignore_errors=True)
            if error is None:
                prune(self.run_dir, self.keep_last)
                size_gb = sum(e["size"] for e in merged.values()) / 1e9
        # Returning means complete on every rank: a rank that exits next cannot outrun the marker.
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0]:
            raise UserError(outcome[0])
        return {"ckpt_s": time.perf_counter() - start, "ckpt_gb": size_gb}

    def restore(self, checkpoint: Path, states: dict[str, Stateful]) -> dict[str, Any]:
        """Load the backend's shards, then every stateful part, from a verified checkpoint; returns
        the saved state (a dict of each part's state_dict, plus step and world size).

        Each rank's RNG comes back only on the world size that saved it: on another one, rank r's
        generator state would belong to a different rank's slice of the work."""
        saved = read_state(checkpoint)
        restore_rng = int(saved["world_size"]) == self.world_size
        self.backend.load(checkpoint)
        for name, obj in states.items():
            if name in saved:
                obj.load_state_dict(saved[name])
        rng = rng_file(checkpoint, self.rank)
        if restore_rng and rng.is_file():
            try:
                RNGState().load_state_dict(torch.load(rng, weights_only=True))
            except Exception as err:  # an unpickling or format error of a file that verified
                raise CheckpointError(f"{rng}: unreadable RNG state ({type(err).__name__})") from None
        return saved


def _describe_save_error(err: Exception, path: Path) -> str:
    """One line for a failed save; a full disk is named as such (torch reports it as a RuntimeError)."""
    text = str(err)
    if isinstance(err, UserError):
        return text
    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        "No space left" in text or "file write failed" in text or "basic_ios::clear" in text
    )
    if full or _disk_nearly_full(path):
        return f"{path.parent}: no space left on device while saving {path.name}; the previous checkpoint is kept"
    return f"{path}: saving failed ({type(err).__name__}: {text.splitlines()[0] if text else ''})"


def _disk_nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < 1 << 20
    except OSError:
        return False


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
