"""`python -m llmtrain.distributed.leftovers`: clear what killed runs left on this machine.

Two things outlive a killed DeepSpeed CPU job and hurt every later one: a torch-extension build
lock (later runs wait on it forever; `extensions`) and DeepSpeed's shared-memory allreduce segments
(tens of MB each in /dev/shm, which is RAM; `shm`). The launcher runs this once per machine before
the ranks start, and again between restarts.
"""

from __future__ import annotations

import argparse
import sys

from llmtrain.distributed import extensions, shm
from llmtrain.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Clear (or, with --check, report) stale build locks and shared-memory segments; exit status 2
    when --check finds a stale lock."""
    parser = argparse.ArgumentParser(
        prog="python -m llmtrain.distributed.leftovers", description=main.__doc__
    )
    parser.add_argument(
        "--check", action="store_true", help="report stale build locks instead of removing them"
    )
    parser.add_argument(
        "--min-age-s", type=float, default=600.0, help="idle time before a build lock is stale"
    )
    args = parser.parse_args(argv)
    if not args.check:
        count, freed = shm.clear_stale_segments()
        if count:
            print(
                f"llmtrain: removed {count} stale DeepSpeed shared-memory segment(s) from {shm.SHM_DIR} "
                f"({freed / 2**20:.0f} MiB of RAM; left by earlier CPU jobs)",
                file=sys.stderr,
            )
    try:
        extensions.check_build_locks(clear=not args.check, min_age_s=args.min_age_s)
    except UserError as err:
        print(f"llmtrain: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
