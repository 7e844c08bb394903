"""The shared-memory segments of DeepSpeed's CPU allreduce: released once mapped, cleared when left.

On CPU ranks that all sit on one machine, DeepSpeed 0.19.8's `deepspeed_shm_comm` op creates one
segment per rank, `/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`
(about 69 MB), in `deepspeed.init_distributed`, and maps every peer's. It never unlinks them: each
job leaves `world × 69 MB` of tmpfs behind, which is memory. A machine running many short jobs
(a test suite, a sweep; each picks a new port) fills /dev/shm and then its RAM, and everything on
it slows to a crawl (seen here: 322 segments, 21 GB of 24 GB, builds killed by the OOM killer).

`release_own_segment` fixes it for our runs: once every rank has passed `init_distributed` (a
barrier), every rank has mapped every peer's segment, so each unlinks its own name; the mappings
live on, and the kernel frees the memory when the last rank exits, however it exits.
`clear_stale_segments` removes what older or killed runs left: a segment of this user that no live
process maps and that did not change for `min_age_s` (a rank maps its segment microseconds after
creating it).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"  # shm.cpp: SHM_BUFFER_NAME


def segment_path(rank: int, *, addr: str | None = None, port: str | None = None) -> Path:
    """The segment DeepSpeed's op names for `rank` (shm.cpp: shm_initialize)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return SHM_DIR / f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_own_segment(rank: int, world_size: int) -> bool:
    """Unlink this rank's segment after every rank has mapped it; collective when `world_size` > 1.

    Call it on every rank right after `deepspeed.init_distributed` on CPU ranks (a no-op where the op
    made no segment: GPU, ranks on several machines, a plain process). True when a segment was unlinked.
    """
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank is past shm_initialize, which maps all peers' segments
    with contextlib.suppress(FileNotFoundError):
        segment_path(rank).unlink()
        return True
    return False


def stale_segments(*, min_age_s: float = 60.0) -> list[Path]:
    """Segments of this user that no live process maps and that are older than `min_age_s`."""
    import time

    mine = f"{PREFIX}_{os.getuid()}_"
    now = time.time()
    old = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(SHM_DIR):
            if entry.name.startswith(mine):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime >= min_age_s:
                        old.append(Path(entry.path))
    if not old or not os.path.isdir("/proc/self/map_files"):
        return []
    mapped = _mapped_shm_files()
    return sorted(p for p in old if str(p) not in mapped)


def clear_stale_segments(*, min_age_s: float = 60.0) -> tuple[int, int]:
    """Remove `stale_segments`; (how many, bytes freed)."""
    count = freed = 0
    for path in stale_segments(min_age_s=min_age_s):
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            count += 1
            freed += size
    return count, freed


def _mapped_shm_files() -> set[str]:
    """Paths under /dev/shm that some live process maps (as its /proc/<pid>/maps shows them)."""
    prefix = f"{SHM_DIR}/{PREFIX}_"
    mapped: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as maps:
                for line in maps:
                    start = line.find(prefix)
                    if start != -1:
                        mapped.add(line[start:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:  # gone, or another user's process (its segments are not ours to clear)
            continue
    return mapped
