"""A checkpoint's MANIFEST.json: the size and checksum of every file, checked before anything is unpickled.

DeepSpeed loads its files with `weights_only=False`, and a few flipped bits in an optimizer shard
unpickle without complaint and resume from wrong weights. So each rank hashes the files it wrote,
rank 0 gathers the entries and writes the manifest (before `COMPLETE`), and at load every rank checks
its share of the entries, split by size, before DeepSpeed opens a file.

    {"format": 1, "algorithm": "crc32",
     "files": {"mp_rank_00_model_states.pt": {"size": 123, "checksum": "crc32:1a2b3c4d"}, ...}}

CRC32 is the default because it was the fastest stdlib checksum measured here (bench/bench_manifest.py)
and it catches every burst of up to 32 flipped bits and random damage with odds of 2^-32 of missing it.
It guards against corruption, not against someone who can rewrite the manifest too. Each checksum
names its algorithm, so a manifest written with another one still verifies.

Standard library only (and llmtrain's own errors and atomic write): verification must run before
torch or DeepSpeed touch a file.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import stat
import threading
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Protocol

from llmtrain.errors import CheckpointError
from llmtrain.io import write_atomic

MANIFEST = "MANIFEST.json"
FORMAT = 1
ALGORITHM = "crc32"
# 4 MiB reads: the buffer stays in the CPU cache between the kernel's copy and the checksum; 8-64 MiB
# measured 20-45% slower from the page cache, and each hashing thread holds one buffer.
READ_SIZE = 4 << 20
# Written after the manifest, so they cannot be in it.
_NOT_LISTED = {MANIFEST, f".{MANIFEST}.tmp", "COMPLETE"}


class UnverifiedCheckpoint(CheckpointError):
    """The checkpoint has no MANIFEST.json (written before manifests existed, or by hand)."""


# ---------------------------------------------------------------- checksums


class _Hasher(Protocol):
    def update(self, data: memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


class _ZlibChecksum:
    """zlib's running 32-bit checksums behind hashlib's update/hexdigest interface."""

    def __init__(self, function: Callable[[memoryview, int], int], start: int) -> None:
        self._function = function
        self._value = start

    def update(self, data: memoryview) -> None:
        self._value = self._function(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


# Every algorithm a manifest may name. All release the GIL on large buffers, so threads hash in parallel.
CHECKSUMS: dict[str, Callable[[], _Hasher]] = {
    "crc32": lambda: _ZlibChecksum(zlib.crc32, 0),
    "adler32": lambda: _ZlibChecksum(zlib.adler32, 1),
    "blake2b": hashlib.blake2b,
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
}

_buffers = threading.local()


def _read_buffer(size: int) -> memoryview:
    """One buffer per thread, reused for every file: allocating one per small file would cost more
    than reading it."""
    buffer = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) != size:
        buffer = _buffers.buffer = bytearray(size)
    return memoryview(buffer)


def checksum_file(path: Path, algorithm: str = ALGORITHM, read_size: int = READ_SIZE) -> tuple[int, str]:
    """(bytes read, "<algorithm>:<hex>") of one file. The size is what was hashed, not a separate stat."""
    hasher = CHECKSUMS[algorithm]()
    buffer = _read_buffer(read_size)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(buffer[:n])
            size += n
    return size, f"{algorithm}:{hasher.hexdigest()}"


def _in_threads(function: Callable, items: list, threads: int) -> list:
    """`function` over `items` (largest first is the caller's business) in a fresh pool: its threads,
    and the read buffers they hold, end when it returns."""
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="manifest") as pool:
        return list(pool.map(function, items))


def hash_files(root: Path, relpaths: list[str], threads: int = 4) -> dict[str, dict]:
    """{relpath: {"size", "checksum"}} of files under `root`; each rank calls it for the files it wrote."""
    root = Path(root)
    order = sorted(relpaths, key=lambda p: -(root / p).stat().st_size)  # big files first: even finish
    results = _in_threads(lambda p: checksum_file(root / p), order, threads)
    return {p: {"size": size, "checksum": checksum} for p, (size, checksum) in sorted(zip(order, results))}


# ---------------------------------------------------------------- the manifest file


def write_manifest(folder: Path, entries: dict[str, dict]) -> None:
    """Write `folder/MANIFEST.json` so a reader sees no manifest or the whole of it, never a part."""
    folder = Path(folder)
    algorithms = sorted({entry["checksum"].partition(":")[0] for entry in entries.values()})
    document = {
        "format": FORMAT,
        "algorithm": ",".join(algorithms) or ALGORITHM,
        "files": {
            p: {"size": entries[p]["size"], "checksum": entries[p]["checksum"]} for p in sorted(entries)
        },
    }
    write_atomic(folder / MANIFEST, json.dumps(document, indent=1) + "\n")


def _check_entry(path: Path, relpath: object, entry: object) -> None:
    """Raise unless the entry is a safe relative path with an int size and a known "<algo>:<hex>"."""
    where = f"{path}: entry {relpath!r}"
    parts = PurePosixPath(relpath).parts if isinstance(relpath, str) else ()
    if not parts or PurePosixPath(relpath).is_absolute() or ".." in parts:
        raise CheckpointError(f"{where} is not a path inside the checkpoint folder")
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} is not an object")
    size, checksum = entry.get("size"), entry.get("checksum")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CheckpointError(f"{where} has no valid size ({size!r})")
    algorithm, _, digest = checksum.partition(":") if isinstance(checksum, str) else ("", "", "")
    if algorithm not in CHECKSUMS or not digest:
        raise CheckpointError(
            f"{where} has checksum {checksum!r}; this llmtrain knows {', '.join(CHECKSUMS)} "
            "(written by a newer version?)"
        )


def read_manifest(folder: Path) -> dict | None:
    """The parsed manifest, or None if the folder has none; CheckpointError naming it if it is garbage."""
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the manifest is corrupt") from None
    if not isinstance(document, dict) or not isinstance(document.get("files"), dict):
        raise CheckpointError(f"{path}: not a checkpoint manifest (no 'files' object)")
    version = document.get("format")
    if version != FORMAT:
        raise CheckpointError(f"{path}: manifest format {version!r}, this llmtrain reads format {FORMAT}")
    for relpath, entry in document["files"].items():
        _check_entry(path, relpath, entry)
    return document


def list_files(folder: Path) -> list[str]:
    """Every regular file under `folder` as sorted posix paths relative to it, except the manifest and
    `COMPLETE`: what the manifest of this folder should list."""
    folder = Path(folder)
    found = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            full = Path(dirpath, name)
            relpath = full.relative_to(folder).as_posix()
            if relpath not in _NOT_LISTED and full.is_file():
                found.append(relpath)
    return sorted(found)


# ---------------------------------------------------------------- verification


def share_of_rank(entries: dict[str, dict], rank: int, world_size: int) -> list[str]:
    """The relpaths `rank` verifies: largest file first to the rank with the fewest bytes so far
    (ties to the lower rank), so every rank computes the same split and they finish close together."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    loads = [(0, r) for r in range(world_size)]  # (bytes assigned, rank): a min-heap
    mine = []
    for relpath in sorted(entries, key=lambda p: (-entries[p]["size"], p)):
        assigned, owner = heapq.heappop(loads)
        if owner == rank:
            mine.append(relpath)
        heapq.heappush(loads, (assigned + entries[relpath]["size"], owner))
    return sorted(mine)


def _problem(folder: Path, relpath: str, entry: dict, *, hash_it: bool) -> str | None:
    """What is wrong with one file, as the error line, or None. Without `hash_it` only the size."""
    path = folder / relpath
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return f"{path}: not a regular file"
        if info.st_size != entry["size"]:
            kind = "truncated" if info.st_size < entry["size"] else "larger than when saved"
            return f"{path}: {info.st_size} bytes, manifest says {entry['size']} ({kind})"
        if not hash_it:
            return None
        algorithm = entry["checksum"].partition(":")[0]
        size, checksum = checksum_file(path, algorithm)
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as e:
        return f"{path}: unreadable ({e.strerror or e})"
    if size != entry["size"]:
        return f"{path}: changed size while being read ({size} bytes, manifest says {entry['size']})"
    if checksum != entry["checksum"]:
        return f"{path}: checksum mismatch (altered or corrupt)"
    return None


def _first(problems: Iterable[str | None]) -> str | None:
    return next((p for p in problems if p is not None), None)


def verify(folder: Path, *, rank: int = 0, world_size: int = 1, threads: int = 4) -> None:
    """Check this rank's share of the manifest; raise CheckpointError naming the first bad file.

    Sizes are checked before any hashing, so a missing or truncated file fails in milliseconds.
    Ranks fail independently: the caller agrees across ranks (e.g. all-reduce) before loading.
    """
    folder = Path(folder)
    document = read_manifest(folder)
    if document is None:
        raise UnverifiedCheckpoint(
            f"{folder} has no {MANIFEST}, so its files cannot be checked for corruption; "
            "set checkpoint.trust_unverified=true to load it anyway"
        )
    entries = document["files"]
    mine = share_of_rank(entries, rank, world_size)
    problem = _first(_problem(folder, p, entries[p], hash_it=False) for p in mine)
    if problem is None:
        biggest_first = sorted(mine, key=lambda p: -entries[p]["size"])
        found = _in_threads(lambda p: _problem(folder, p, entries[p], hash_it=True), biggest_first, threads)
        by_path = dict(zip(biggest_first, found))
        problem = _first(by_path[p] for p in mine)  # the first in path order, however the threads finished
    if problem is not None:
        raise CheckpointError(problem)


def verify_all(folder: Path, threads: int = 4) -> None:
    """Check every file of the manifest in this one process."""
    verify(folder, rank=0, world_size=1, threads=threads)
