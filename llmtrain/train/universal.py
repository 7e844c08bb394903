"""DeepSpeed's universal checkpoint: the bridge between data-parallel world sizes (and ZeRO stages).

ZeRO-1/2/3 checkpoints hold each rank's flat partition of the optimizer state, so they only load on
the world size that wrote them. `ds_to_universal` rewrites them as one file per parameter (fp32
weight, exp_avg, exp_avg_sq), which any world size loads with `checkpoint.load_universal`. The
trainer converts on demand when the world size changed; `llmtrain checkpoint` does it ahead of time
(for the checkpoint named by `resume`, default the run's newest complete one).
"""

from __future__ import annotations

import contextlib
import io
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

from llmtrain.config import Config
from llmtrain.errors import CheckpointError
from llmtrain.train import checkpoint as ckpt


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


def convert(checkpoint: Path) -> Path:
    """Write `<checkpoint>_universal/` (once) with our state files beside DeepSpeed's; return it."""
    from deepspeed.checkpoint import ds_to_universal

    checkpoint = Path(checkpoint)
    if not ckpt.is_complete(checkpoint):
        raise CheckpointError(f"{checkpoint}: incomplete checkpoint (no {ckpt.COMPLETE} marker)")
    out = checkpoint.with_name(checkpoint.name + ckpt.UNIVERSAL_SUFFIX)
    if ckpt.is_complete(out):
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = Namespace(
        input_folder=str(checkpoint),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{checkpoint}: universal conversion failed: {type(err).__name__}: {err}"
        ) from err
    finally:
        # ds_to_universal points a `latest_universal` file at its output; we track completeness ourselves.
        (checkpoint.parent / "latest_universal").unlink(missing_ok=True)
    # The RNG files too: a resume through this folder on the same world size restores them.
    for src in (checkpoint / ckpt.STATE_FILE, checkpoint / ckpt.CONFIG_FILE, *ckpt.rng_files(checkpoint)):
        shutil.copy2(src, tmp / src.name)
    ckpt.write_atomic(tmp / ckpt.COMPLETE, (checkpoint / ckpt.COMPLETE).read_text())
    tmp.rename(out)
    return out


def ensure_universal(checkpoint: Path) -> Path:
    """Collective: rank 0 converts (if not done yet), every rank gets the path or the same error."""
    import torch.distributed as dist

    if checkpoint.name.endswith(ckpt.UNIVERSAL_SUFFIX):
        return checkpoint
    result: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result[0] = str(convert(checkpoint))
        except CheckpointError as err:
            result[0] = err
    dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], CheckpointError):
        raise result[0]
    return Path(result[0])


def main(cfg: Config) -> int:
    """`llmtrain checkpoint [run.name=...] [resume=<checkpoint>]`: convert to the universal format."""
    which = None if cfg.resume in ("auto", "none") else cfg.resume
    source = ckpt.resolve_checkpoint(cfg.run_dir, which)
    out = convert(source)
    print(f"llmtrain checkpoint: {out}")
    return 0
