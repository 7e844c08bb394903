"""Tokenization throughput: our shard-preparation path against raw sentencepiece, and worker scaling.

    python bench/bench_tokenize.py [--chars 8000000] [--repeats 3] [--workers 1 2] [--tokenizer PATH]

Corpus: the Python standard library's source (as `data=stdlib`), its first `--chars` characters.
Tokenizer: `--tokenizer` (a .model file), else one trained here with the default settings.

Rows:
  raw sentencepiece             `SentencePieceProcessor.encode(docs, num_threads=1)`, one core
  ours, encode_chunk            the worker function over the chunks prepare cuts (EOS appended,
                                numpy arrays, byte counts), one core: our per-worker cost
  ours, prepare.workers=N       the ordered pool prepare uses (in process for N=1), from document
                                texts to token arrays back in the main process (no reading/writing)
Columns: tokens per wall second and per CPU second of this process (the steadier per-core figure on
a shared machine; not meaningful for a pool), median and (min..max) over interleaved repeats, and
the ratio of medians to raw sentencepiece. Target: ours >= 0.8x raw per core.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from llmtrain.data import prepare as prep
from llmtrain.data.config import SourceConfig, TokenizerConfig
from llmtrain.data.corpus import iter_documents
from llmtrain.data.tokenizer import Tokenizer, train_tokenizer


def load_docs(chars: int) -> list[str]:
    docs, total = [], 0
    for doc in iter_documents(SourceConfig(name="stdlib", path="stdlib", format="stdlib")):
        docs.append(doc.text)
        total += len(doc.text)
        if total >= chars:
            break
    return docs


def chunks_of(docs: list[str]) -> list[list[str]]:
    """The documents cut into the chunks prepare hands its workers."""
    return [texts for texts, _ in prep.chunked((text, "train") for text in docs)]


RAW = "raw sentencepiece (1 core)"


def _count(item) -> int:
    """Tokens of one pooled result, EOS not counted (raw sentencepiece adds none)."""
    _, (flat, lengths, _) = item
    return int(flat.size) - int(lengths.size)


def timed(fn) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process) of one run of fn (which
    returns its token count). On a shared machine the CPU-time rate is the steadier per-core figure;
    for the pooled rows it counts only the main process, so it is not shown there."""
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    return n / (time.perf_counter() - w0), n / max(time.process_time() - c0, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chars", type=int, default=8_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizer", type=Path, default=None)
    args = ap.parse_args()

    docs = load_docs(args.chars)
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tok = train_tokenizer(TokenizerConfig(), docs, tmp)
    chunks = chunks_of(docs)
    print(
        f"corpus: {len(docs)} stdlib files, {sum(map(len, docs)):,} chars; tokenizer vocab {tok.vocab_size}"
    )

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tok.model_bytes)

    def raw() -> int:
        return sum(len(ids) for c in chunks for ids in sp.encode(c, out_type=int, num_threads=1))

    prep.init_worker(tok.model_bytes)

    def ours() -> int:
        return sum(int(prep.encode_chunk(c)[0].size) - len(c) for c in chunks)  # EOS not counted

    encoders = {w: prep._Encoder(tok, w) for w in args.workers}

    def pooled(encoder) -> int:
        n = 0
        for c in chunks:
            encoder.submit(c, None)
            while encoder.full():
                n += _count(encoder.pop())
        while encoder.pending:
            n += _count(encoder.pop())
        return n

    paths = {RAW: raw, "ours, encode_chunk (1 core)": ours}
    for w, encoder in encoders.items():
        encoder.submit(chunks[0], None)  # start-up (spawning workers) is not throughput
        encoder.pop()
        paths[f"ours, prepare.workers={w}"] = lambda e=encoder: pooled(e)
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for _ in range(args.repeats):  # interleaved, so a change in machine load hits every row alike
            for name, fn in paths.items():
                w, c = timed(fn)
                wall[name].append(w)
                cpu[name].append(c)
    finally:
        for encoder in encoders.values():
            encoder.close(True)

    def cell(rates: list[float]) -> str:
        return f"{statistics.median(rates) / 1e6:.2f}M ({min(rates) / 1e6:.2f}..{max(rates) / 1e6:.2f})"

    raw_wall, raw_cpu = statistics.median(wall[RAW]), statistics.median(cpu[RAW])
    print(
        f"\n{'path':<28} {'wall tok/s: median (min..max)':>30} {'vs raw':>7}   {'CPU tok/s: median (min..max)':>30} {'vs raw':>7}"
    )
    for name in paths:
        in_process = not name.startswith("ours, prepare.workers=") or name.endswith("=1")
        c = (cell(cpu[name]), f"{statistics.median(cpu[name]) / raw_cpu:.2f}x") if in_process else ("-", "")
        print(
            f"{name:<28} {cell(wall[name]):>30} {statistics.median(wall[name]) / raw_wall:>6.2f}x   {c[0]:>30} {c[1]:>7}"
        )
    print(f"(repeats: {args.repeats}; tokens per repeat: {ours():,})")


if __name__ == "__main__":
    main()
