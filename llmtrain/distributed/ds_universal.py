"""DeepSpeed's universal conversion (`ds_to_universal`), run in a process of its own.

The converter reads every rank's optimizer partition and writes one folder per parameter, with
`workers` processes for the extraction and the merge (`ProcessPoolExecutor`, forked). A training
rank is a poor parent for that: its communication and loader threads, and OpenMP's thread pool,
do not survive a fork safely, and the converter's memory (the whole optimizer state, at 7B about
85 GB) would stay with the rank. So the backend starts
`python -m llmtrain.distributed.ds_universal CHECKPOINT OUT --workers N` and waits for it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from argparse import Namespace
from pathlib import Path


def default_workers() -> int:
    """One per core this process may use, at most 16 (the converter is bound by disk beyond that)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(16, cores))


def convert(checkpoint: Path, out: Path, workers: int) -> None:
    """`ds_to_universal` of `checkpoint` into the new folder `out`, in this process."""
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(
        input_folder=str(checkpoint),
        output_folder=str(out),
        num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2),  # merging holds whole parameters: fewer at once
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
    finally:
        # ds_to_universal points a `latest_universal` file at its output; we track completeness ourselves.
        (Path(checkpoint).parent / "latest_universal").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtrain.distributed.ds_universal", description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", type=int, default=0, help="0 = one per core, up to 16")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the converter computes nothing on a device
    try:
        convert(args.checkpoint, args.out, args.workers or default_workers())
    except Exception as err:  # the parent turns this line into a CheckpointError
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
