"""Loader throughput: tokens/s per rank for random (16 x 1024) windows from memory-mapped shards.

Builds synthetic shards (default 50M tokens, uint16, random document lengths) in a temporary folder,
then times TrainLoader.next_batch() for one rank: a single source, and a three-source weighted
mixture over the same total. Also reports how fast ShardWriter wrote the shards.

    python bench/bench_loader.py [--tokens 50000000] [--repeats 7] [--batches 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from llmtrain.data.config import SourceConfig
from llmtrain.data.loader import TrainLoader
from llmtrain.data.shards import ShardWriter, shard_prefix

VOCAB = 32_000
HASH = "bench"


def build_source(data_dir: Path, name: str, num_tokens: int, shard_tokens: int, seed: int) -> float:
    """Write one source's train shards; returns the writer's tokens/s."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, VOCAB, size=num_tokens, dtype=np.uint16)
    lengths = rng.geometric(1 / 800, size=num_tokens // 100 + 1)
    ends = np.minimum(np.cumsum(lengths), num_tokens)
    ends = np.unique(np.append(ends, num_tokens))
    t0 = time.perf_counter()
    shard, writer, start = 0, None, 0
    for end in ends.tolist():
        if writer is None:
            writer = ShardWriter(shard_prefix(data_dir, name, "train", shard), VOCAB, HASH)
        writer.add_document(stream[start:end])
        start = end
        if writer.num_tokens >= shard_tokens:
            writer.close()
            writer, shard = None, shard + 1
    if writer is not None:
        writer.close()
    return num_tokens / (time.perf_counter() - t0)


def time_loader(loader: TrainLoader, repeats: int, batches: int) -> list[float]:
    for _ in range(20):  # warm up: page cache, mixing-block layout
        loader.next_batch()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            n += loader.next_batch()["tokens"].numel()
        rates.append(n / (time.perf_counter() - t0))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000_000, help="total tokens of synthetic shards")
    parser.add_argument("--shard-tokens", type=int, default=10_000_000)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=200, help="micro-batches per repeat")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        write_rate = build_source(data_dir, "single", args.tokens, args.shard_tokens, seed=0)
        mix = [("web", 0.6, 3.0), ("code", 0.3, 1.0), ("books", 0.1, 1.0)]
        for i, (name, share, _) in enumerate(mix):
            build_source(data_dir, name, int(args.tokens * share), args.shard_tokens, seed=i + 1)
        cases = {
            "1 source": [SourceConfig(name="single", path="-")],
            "3-source mixture 3:1:1": [SourceConfig(name=n, path="-", weight=w) for n, _, w in mix],
        }
        print(
            f"synthetic shards: {args.tokens / 1e6:.0f}M tokens per case, uint16, shards of "
            f"{args.shard_tokens / 1e6:.0f}M tokens; ShardWriter wrote {write_rate / 1e6:.1f}M tokens/s"
        )
        print(
            f"random windows of {args.micro_batch} x {args.seq_len + 1}, {args.repeats} repeats x "
            f"{args.batches} micro-batches, one rank\n"
        )
        print(f"| {'case':<24} | {'median Mtok/s':>13} | {'min':>6} | {'max':>6} | {'ms/batch':>8} |")
        print(f"|{'-' * 26}|{'-' * 15}|{'-' * 8}|{'-' * 8}|{'-' * 10}|")
        for label, sources in cases.items():
            loader = TrainLoader(
                data_dir,
                sources,
                seq_len=args.seq_len,
                micro_batch_size=args.micro_batch,
                global_batch_size=args.micro_batch,
                vocab_size=VOCAB,
                tokenizer_hash=HASH,
            )
            rates = time_loader(loader, args.repeats, args.batches)
            med = statistics.median(rates)
            ms = args.micro_batch * (args.seq_len + 1) / med * 1e3
            print(
                f"| {label:<24} | {med / 1e6:>13.1f} | {min(rates) / 1e6:>6.1f} | {max(rates) / 1e6:>6.1f} "
                f"| {ms:>8.3f} |"
            )


if __name__ == "__main__":
    main()
