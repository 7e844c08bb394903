"""Checkpoint manifest throughput: GB/s of each stdlib checksum over files, and of hash_files in threads.

Writes random files (default 2 GB in 8 files) in a temporary folder, then times every algorithm
manifest.CHECKSUMS knows at one read size, the default algorithm at several read sizes, and
hash_files / verify_all with 1, 2 and 4 threads; each repeat runs every case once. Files are read
from the page cache unless --cold, which drops them from it (fsync + POSIX_FADV_DONTNEED) before
every timing, as at a real resume. BENCH_DIR picks the folder's file system (default: $TMPDIR).

    python bench/bench_manifest.py [--gb 2] [--files 8] [--repeats 5] [--cold]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llmtrain.train import manifest

MIB = 1 << 20


def write_random_files(folder: Path, total_bytes: int, count: int) -> list[str]:
    """`count` files of random bytes, one in a `zero/` subfolder as in a universal checkpoint."""
    names = [f"zero/param_{i}/fp32.pt" if i == count - 1 else f"shard_{i}.pt" for i in range(count)]
    chunk = os.urandom(64 * MIB)  # the checksums' speed does not depend on the bytes
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = total_bytes // count
            while left > 0:
                left -= f.write(chunk[: min(left, len(chunk))])
    return names


def drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_interleaved(
    cases: dict[str, Callable[[], object]], paths: list[Path], repeats: int, cold: bool
) -> dict[str, list[float]]:
    """GB/s of each case per repeat. Every repeat runs every case once, so a noisy neighbour on a shared
    machine slows all cases alike instead of whichever happened to run at the time."""
    total = sum(p.stat().st_size for p in paths)
    if not cold:
        for run in cases.values():
            run()  # warm up: page cache, read buffers, thread start-up
    rates: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(repeats):
        for label, run in cases.items():
            if cold:
                drop_from_page_cache(paths)
            t0 = time.perf_counter()
            run()
            rates[label].append(total / (time.perf_counter() - t0) / 1e9)
    return rates


def row(label: str, rates: list[float]) -> str:
    return f"| {label:<34} | {statistics.median(rates):>11.2f} | {min(rates):>5.2f} | {max(rates):>5.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="total size of the random files")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--read-mib", type=float, default=manifest.READ_SIZE // MIB, help="for the algorithms"
    )
    parser.add_argument("--cold", action="store_true", help="drop the files from the page cache each repeat")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        names = write_random_files(root, int(args.gb * 1e9), args.files)
        paths = [root / n for n in names]
        cache = "cold (dropped from the page cache each repeat)" if args.cold else "page cache"
        print(f"{args.files} files, {args.gb:g} GB of random bytes, {cache}; {args.repeats} repeats")
        print(f"{os.cpu_count()} CPUs; one thread unless a row says otherwise\n")
        print(f"| {'case':<34} | {'median GB/s':>11} | {'min':>5} | {'max':>5} |")
        print(f"|{'-' * 36}|{'-' * 13}|{'-' * 7}|{'-' * 7}|")

        def one_thread(algorithm: str, read_size: int) -> Callable[[], None]:
            return lambda: [manifest.checksum_file(p, algorithm, read_size) for p in paths]

        manifest.write_manifest(root, manifest.hash_files(root, names))
        cases: dict[str, Callable[[], object]] = {}
        for algorithm in manifest.CHECKSUMS:
            cases[f"{algorithm}, {args.read_mib:g} MiB reads"] = one_thread(
                algorithm, int(args.read_mib * MIB)
            )
        for mib in (0.25, 1, 2, 4, 8, 16, 32, 64):
            cases[f"{manifest.ALGORITHM}, {mib:g} MiB reads"] = one_thread(manifest.ALGORITHM, int(mib * MIB))
        for threads in (1, 2, 4):
            cases[f"hash_files, {threads} thread(s)"] = lambda t=threads: manifest.hash_files(root, names, t)
            cases[f"verify_all, {threads} thread(s)"] = lambda t=threads: manifest.verify_all(root, t)
        for label, rates in time_interleaved(cases, paths, args.repeats, args.cold).items():
            print(row(label, rates))


if __name__ == "__main__":
    main()
