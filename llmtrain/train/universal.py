"""DeepSpeed's universal checkpoint: the bridge between data-parallel world sizes (and ZeRO stages).

ZeRO-1/2/3 checkpoints hold each rank's flat partition of the optimizer state, so they only load on
the world size that wrote them. The universal form has one file per parameter (fp32 weight,
exp_avg, exp_avg_sq), which any world size loads. The trainer converts on demand when the world
size changed; `llmtrain checkpoint` does it ahead of time (for the checkpoint named by `resume`,
default the run's newest verified one). The conversion itself is the backend's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llmtrain import faults
from llmtrain.config import Config
from llmtrain.distributed.backend import convert_to_universal
from llmtrain.errors import CheckpointError
from llmtrain.io import write_atomic
from llmtrain.train import checkpoint as ckpt
from llmtrain.train import manifest


def needs_universal(state: dict[str, Any], world_size: int, zero_stage: int, path: Path) -> bool:
    """Whether resuming `state` (saved at `path`) on this world / ZeRO stage must go through universal."""
    if path.name.endswith(ckpt.UNIVERSAL_SUFFIX):
        return True
    saved_world, saved_stage = int(state["world_size"]), int(state["zero_stage"])
    if saved_stage == 0 and zero_stage == 0:
        return False  # ZeRO-0 keeps the whole optimizer state in mp_rank_00: any world size loads it
    same_layout = saved_stage == zero_stage or {saved_stage, zero_stage} <= {1, 2}
    if saved_world == world_size and same_layout:
        return False
    if 0 in (saved_stage, zero_stage):
        raise CheckpointError(
            f"{path}: saved with ZeRO stage {saved_stage} on {saved_world} ranks; resuming with stage "
            f"{zero_stage} on {world_size} ranks needs a universal checkpoint, which DeepSpeed supports "
            "only between ZeRO stages 1-3"
        )
    return True


def convert(checkpoint: Path, *, workers: int = 0) -> Path:
    """Write `<checkpoint>_universal/` (once, with its own manifest) with `workers` processes; return it.

    The source must have been verified by the caller: the conversion unpickles its files.
    """
    checkpoint = Path(checkpoint)
    if not ckpt.is_complete(checkpoint):
        raise CheckpointError(f"{checkpoint}: incomplete checkpoint (no {ckpt.COMPLETE} marker)")
    out = checkpoint.with_name(checkpoint.name + ckpt.UNIVERSAL_SUFFIX)
    if ckpt.is_complete(out):
        try:
            manifest.verify_all(out)
            return out
        except CheckpointError:
            pass  # a damaged earlier conversion: make it again
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    try:
        convert_to_universal(checkpoint, tmp, workers=workers)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The RNG files too: a resume through this folder on the same world size restores them.
    for src in (checkpoint / ckpt.STATE_FILE, checkpoint / ckpt.CONFIG_FILE, *ckpt.rng_files(checkpoint)):
        shutil.copy2(src, tmp / src.name)
    manifest.write_manifest(tmp, manifest.hash_files(tmp, manifest.list_files(tmp)))
    write_atomic(tmp / ckpt.COMPLETE, (checkpoint / ckpt.COMPLETE).read_text())
    tmp.rename(out)
    return out


def ensure_universal(checkpoint: Path, *, workers: int = 0, timeout_s: float = 6 * 3600) -> Path:
    """Collective: rank 0 converts (if not done yet), every rank gets the path or the same error.

    The other ranks wait in a collective of a process group of its own, whose timeout is
    `timeout_s` (checkpoint.convert_timeout_s) rather than the job's train.collective_timeout_s: a
    conversion at 7B takes minutes, longer than a stalled rank should be allowed to hang a step.
    """
    import datetime

    import torch.distributed as dist

    if checkpoint.name.endswith(ckpt.UNIVERSAL_SUFFIX):
        return checkpoint
    # gloo whatever the training backend: an object broadcast on the host, no device memory
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    result: list[Any] = [None]
    if dist.get_rank() == 0:
        faults.maybe_fail("convert", int(ckpt.read_state(checkpoint)["step"]))
        try:
            result[0] = str(convert(checkpoint, workers=workers))
        except CheckpointError as err:
            result[0] = err
    dist.broadcast_object_list(result, src=0, group=group)
    dist.destroy_process_group(group)
    if isinstance(result[0], CheckpointError):
        raise result[0]
    return Path(result[0])


def main(cfg: Config) -> int:
    """`llmtrain checkpoint [run.name=...] [resume=<checkpoint>]`: convert to the universal format."""
    which = None if cfg.resume in ("auto", "none") else cfg.resume
    source = ckpt.resolve_checkpoint(cfg.run_dir, which, trust_unverified=cfg.checkpoint.trust_unverified)
    out = convert(source, workers=cfg.checkpoint.convert_workers)
    print(f"llmtrain checkpoint: {out}")
    return 0
