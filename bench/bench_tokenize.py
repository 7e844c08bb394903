"""Tokenization throughput: our shard-preparation path against raw sentencepiece, and worker scaling.

    python bench/bench_tokenize.py [--chars 8000000] [--repeats 3] [--workers 1 2] [--tokenizer PATH]

Corpus: the Python standard library's source (as `data=stdlib`), its first `--chars` characters.
Tokenizer: `--tokenizer` (a .model file), else one trained here with the default settings.

Rows:
  raw sentencepiece     `SentencePieceProcessor.encode(list_of_docs, num_threads=1)` on one core
  ours, in process      `encode_chunk` over the chunks prepare cuts (EOS appended, numpy arrays,
                        byte counts), one core: the per-worker cost of our path
  ours, prepare.workers=N  the ordered process pool prepare uses (in process for N=1), from texts to
                        token arrays back in the main process (no reading or file writes)
Each row: median and spread (min..max) of tokens/s over the repeats; ratio to raw sentencepiece.
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
    out, cur, size = [], [], 0
    for text in docs:
        cur.append(text)
        size += len(text)
        if len(cur) >= prep._CHUNK_DOCS or size >= prep._CHUNK_CHARS:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def _count(item) -> int:
    """Tokens of one pooled result, EOS not counted (raw sentencepiece adds none)."""
    _, (flat, lengths, _) = item
    return int(flat.size) - int(lengths.size)


def timed(fn, repeats: int) -> list[float]:
    """Tokens/s of each repeat (fn returns its token count)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return rates


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

    prep._init_worker(tok.model_bytes)

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

    paths = {"raw sentencepiece, 1 core": raw, "ours, in process (1 core)": ours}
    for w, encoder in encoders.items():
        encoder.submit(chunks[0], None)  # start-up (spawning workers) is not throughput
        encoder.pop()
        paths[f"ours, prepare.workers={w}"] = lambda e=encoder: pooled(e)
    rates: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for _ in range(args.repeats):  # interleaved, so a change in machine load hits every row alike
            for name, fn in paths.items():
                rates[name] += timed(fn, 1)
    finally:
        for encoder in encoders.values():
            encoder.close(True)
    rows = list(rates.items())
    base = statistics.median(rows[0][1])
    print(f"\n{'path':<32} {'median tok/s':>14} {'spread (min..max)':>24} {'vs raw':>8}")
    for name, rates in rows:
        med = statistics.median(rates)
        spread = f"{min(rates) / 1e6:.2f}M..{max(rates) / 1e6:.2f}M"
        print(f"{name:<32} {med / 1e6:>13.2f}M {spread:>24} {med / base:>7.2f}x")
    print(f"(repeats: {args.repeats}; tokens per repeat: {ours():,})")


if __name__ == "__main__":
    main()
