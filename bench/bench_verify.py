"""Shard verification cost: seconds and GB/s for one rank (one thread) in each `data.verify` mode.

Builds synthetic shards (default 4 x 256 MB, uint16, random document lengths) in a temporary folder,
then times start_verification(...).wait() as rank 0 of a world of 1, so the rank checks everything.
"full (cold)" first drops the shards from the page cache (posix_fadvise DONTNEED), as on a first
run over a corpus that does not fit in memory. Ends with the projected cost of 1 TB over 64 ranks
in shards of the same size: full mode verifies 1/64 of the bytes per rank, and every rank opens every
shard's header in both full and size mode.

    python bench/bench_verify.py [--gb 1.0] [--shards 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from llmtrain.data.shards import ShardWriter, shard_prefix
from llmtrain.data.verify import shards_to_verify, start_verification

VOCAB = 32_000
HASH = "bench"
SOURCE = "synthetic"


def build_shards(data_dir: Path, num_shards: int, shard_tokens: int, seed: int = 0) -> None:
    """Write `num_shards` train shards of random tokens in documents of ~1000 tokens."""
    rng = np.random.default_rng(seed)
    for shard in range(num_shards):
        tokens = rng.integers(0, VOCAB, size=shard_tokens, dtype=np.uint16)
        ends = np.cumsum(rng.geometric(1 / 1000, size=shard_tokens // 500 + 1))
        ends = np.append(ends[ends < shard_tokens], shard_tokens)
        with ShardWriter(shard_prefix(data_dir, SOURCE, "train", shard), VOCAB, HASH) as writer:
            start = 0
            for end in ends.tolist():
                writer.add_document(tokens[start:end])
                start = end


def drop_page_cache(prefixes: list[Path]) -> None:
    """Evict the shard files' pages (no root needed for files we own; clean pages only)."""
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            fd = os.open(prefix.with_name(prefix.name + suffix), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_mode(prefixes: list[Path], mode: str, repeats: int, cold: bool) -> list[float]:
    """Seconds per repeat of one rank checking every shard (after one warm-up run)."""
    start_verification(prefixes, mode=mode, vocab_size=VOCAB, tokenizer_hash=HASH).wait()
    seconds = []
    for _ in range(repeats):
        if cold:
            drop_page_cache(prefixes)
        t0 = time.perf_counter()
        result = start_verification(prefixes, mode=mode, vocab_size=VOCAB, tokenizer_hash=HASH).wait()
        seconds.append(time.perf_counter() - t0)
        assert result.error is None, result.error
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="total size of the synthetic token files")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    shard_tokens = int(args.gb * 1e9 / 2 / args.shards)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        t0 = time.perf_counter()
        build_shards(data_dir, args.shards, shard_tokens)
        prefixes = shards_to_verify(data_dir, [SOURCE])
        total = sum(p.with_name(p.name + ".bin").stat().st_size for p in prefixes)
        print(
            f"synthetic shards: {args.shards} x {total / args.shards / 1e6:.0f} MB uint16, written in "
            f"{time.perf_counter() - t0:.1f} s; one rank, one thread, {args.repeats} repeats\n"
        )
        print(
            f"| {'mode':<11} | {'shards':>6} | {'GB':>5} | {'median s':>8} | {'min-max s':>13} | {'GB/s':>6} |"
        )
        print(f"|{'-' * 13}|{'-' * 8}|{'-' * 7}|{'-' * 10}|{'-' * 15}|{'-' * 8}|")
        medians = {}
        for label, mode, cold in [
            ("full", "full", False),
            ("full (cold)", "full", True),
            ("size", "size", False),
            ("off", "off", False),
        ]:
            seconds = time_mode(prefixes, mode, args.repeats, cold)
            med = medians[label] = statistics.median(seconds)
            rate = f"{total / med / 1e9:6.2f}" if mode == "full" else f"{'-':>6}"
            print(
                f"| {label:<11} | {len(prefixes):>6} | {total / 1e9:>5.2f} | {med:>8.3f} "
                f"| {min(seconds):>6.3f}-{max(seconds):<6.3f} | {rate} |"
            )
        corpus, ranks = 1e12, 64
        tb_shards = corpus / (total / len(prefixes))
        print(f"\nprojected for 1 TB over {ranks} ranks ({tb_shards:.0f} shards of this size):")
        headers = tb_shards * medians["size"] / len(prefixes)
        for label in ("full", "full (cold)"):
            verify = corpus / ranks / (total / medians[label])
            print(f"  {label:<11} {verify + headers:6.1f} s per rank (1/{ranks} of the bytes + every header)")
        print(f"  {'size':<11} {headers:6.1f} s per rank (every shard's header, local disk)")


if __name__ == "__main__":
    main()
