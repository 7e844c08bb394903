"""`llmtrain prepare`: train (or reuse) the tokenizer, then tokenize every source into shards.

The main process reads documents in their fixed order, cuts them into chunks and hands the chunks
to a pool of worker processes; results come back in submission order, so the shards are
byte-identical whatever the worker count. Each source's train and validation documents go to
`shards/<source>/{train,val}_NNNNN`; a shard closes at the first document end past
`prepare.shard_tokens`. A source is finished when `shards/<source>/done.json` exists; an
interrupted source resumes after its last complete shard, but only when `started.json` shows the
interrupted run had the same settings (else its shards are dropped and the source starts over).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmtrain.config import Config
from llmtrain.errors import ConfigError
from llmtrain.data.chat_template import chat_token_ids, trained_flags
from llmtrain.data.clean import clean_sources, source_clean_settings, source_documents
from llmtrain.data.config import SourceConfig
from llmtrain.data.corpus import SPLITS, ReadStats, list_files, split_of
from llmtrain.data.report import write_report
from llmtrain.data.shards import (
    ShardReader,
    ShardWriter,
    list_shards,
    mask_path,
    shard_dir,
    shard_prefix,
)
from llmtrain.data.tokenizer import Tokenizer, encode_chunk, get_tokenizer, init_worker
from llmtrain.errors import DataError
from llmtrain.io import write_atomic

DONE_FILE = "done.json"
STARTED_FILE = "started.json"
_CHUNK_DOCS = 64
_CHUNK_CHARS = 1 << 20


class _Encoder:
    """Ordered encoding of chunks: in-process for one worker, else a process pool with a bounded
    number of chunks in flight (results are taken in submission order)."""

    def __init__(self, tok: Tokenizer, workers: int):
        self.workers = workers
        self.pool = None
        if workers > 1:
            # spawn: safe whatever threads the parent runs (tqdm, torch); the children import only
            # llmtrain.data.tokenizer (numpy, sentencepiece)
            self.pool = mp.get_context("spawn").Pool(workers, init_worker, (tok.model_bytes,))
        else:
            init_worker(tok.model_bytes)
        self.pending: deque = deque()

    def submit(self, chunk: list[str], meta) -> None:
        if self.pool is None:
            self.pending.append((meta, encode_chunk(chunk)))
        else:
            self.pending.append((meta, self.pool.apply_async(encode_chunk, (chunk,))))

    def full(self) -> bool:
        return len(self.pending) >= 3 * self.workers

    def pop(self):
        meta, result = self.pending.popleft()
        return meta, (result if self.pool is None else result.get())

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


@dataclass
class SourceResult:
    name: str
    docs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    shards: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped_records: int = 0
    status: str = "done"
    """done (tokenized now) | resumed (after complete shards of an earlier run) | cached (already complete)."""


def _source_settings(
    src: SourceConfig, tok: Tokenizer, val_fraction: float, clean: dict | None = None
) -> dict:
    """What decides a source's shard contents (compared with done.json before reusing them)."""
    settings = {
        "tokenizer_hash": tok.hash,
        "name": src.name,
        "path": src.path if src.format != "stdlib" else "stdlib",
        "format": src.format,
        "text_field": src.text_field if src.format in ("jsonl", "parquet") else None,
        "separator": src.separator if src.format == "txt" else None,
        "val_fraction": val_fraction,
    }
    if clean is not None:  # only with cleaning on, so that shards prepared before it stay valid
        settings["clean"] = clean
    return settings


def _read_settings_file(path: Path) -> dict | None:
    """The JSON object of done.json / started.json, or None when missing or unreadable."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if isinstance(meta, dict) and isinstance(meta.get("settings"), dict):
            return meta
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    return None  # unreadable: treat the source as unfinished and resume from its shards


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _resume_point(data_dir: Path, src: SourceConfig, split: str, tok: Tokenizer, res: SourceResult) -> int:
    """Number of leading complete shards of an earlier run that can be kept (their totals go into `res`)."""
    kept = 0
    for i, prefix in enumerate(list_shards(data_dir, src.name, split)):
        if prefix != shard_prefix(data_dir, src.name, split, i):
            break  # a gap: everything after it is rewritten
        try:
            reader = ShardReader(prefix, vocab_size=tok.vocab_size, tokenizer_hash=tok.hash)
        except DataError:
            break  # from another tokenizer, or damaged: rewrite from here
        res.docs[split] += reader.num_docs
        res.tokens[split] += reader.num_tokens
        res.bytes[split] += reader.num_bytes
        kept += 1
    res.shards[split] = kept
    return kept


def _remove_stale(data_dir: Path, src: SourceConfig, split: str, count: int) -> None:
    """Drop complete shards numbered >= count and temp files left by an interrupted run."""
    folder = shard_dir(data_dir, src.name)
    for prefix in list_shards(data_dir, src.name, split):
        if int(prefix.name.rsplit("_", 1)[1]) >= count:
            prefix.with_name(prefix.name + ".idx").unlink(missing_ok=True)
            prefix.with_name(prefix.name + ".bin").unlink(missing_ok=True)
            mask_path(prefix).unlink(missing_ok=True)
    for tmp in folder.glob(f"{split}_*.tmp"):
        tmp.unlink(missing_ok=True)


def _cached_result(folder: Path, src: SourceConfig, settings: dict) -> SourceResult | None:
    """The totals of a finished source from its done.json; None when it is not finished."""
    done = _read_settings_file(folder / DONE_FILE)
    if done is None:
        return None
    if done["settings"] != settings:
        changed = {k for k in {*settings, *done["settings"]} if settings.get(k) != done["settings"].get(k)}
        if changed == {"clean"}:
            return None  # other clean settings: the source is cleaned and tokenized again
        diff = ", ".join(
            f"{k}={done['settings'].get(k)!r} (now {v!r})"
            for k, v in settings.items()
            if done["settings"].get(k) != v
        )
        raise DataError(
            f"{folder / DONE_FILE}: shards of source {src.name!r} were made with {diff}; "
            f"delete {folder} to rebuild them"
        )
    res = SourceResult(src.name, status="cached")
    try:
        for split in SPLITS:
            for key in ("docs", "tokens", "bytes", "shards"):
                getattr(res, key)[split] = int(done["splits"][split][key])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"{folder / DONE_FILE}: malformed ({type(err).__name__}: {err}); delete it to re-check the shards"
        ) from None
    res.skipped_records = int(done.get("skipped_records", 0))
    return res


def _start_or_resume(
    data_dir: Path, src: SourceConfig, tok: Tokenizer, settings: dict, res: SourceResult
) -> dict[str, int]:
    """Index of the next shard of each split: after the kept shards of an interrupted run with these
    settings (their totals go into `res`), else 0 with every old shard removed."""
    folder = shard_dir(data_dir, src.name)
    folder.mkdir(parents=True, exist_ok=True)
    started = _read_settings_file(folder / STARTED_FILE)
    if started is not None and started["settings"] == settings:
        return {split: _resume_point(data_dir, src, split, tok, res) for split in SPLITS}
    # Shards of a run with other settings (another path, format or val_fraction) would pass the
    # tokenizer check yet hold other documents: keeping them would silently mix two corpora.
    for split in SPLITS:
        _remove_stale(data_dir, src, split, 0)
    _write_json(folder / STARTED_FILE, {"settings": settings})
    return dict.fromkeys(SPLITS, 0)


def chunked(documents: Iterable[tuple[str, str]]) -> Iterator[tuple[list[str], list[str]]]:
    """(texts, splits) in the chunks handed to one worker task: _CHUNK_DOCS documents or
    _CHUNK_CHARS characters, whichever comes first (big enough to amortize the task overhead)."""
    texts: list[str] = []
    splits: list[str] = []
    chars = 0
    for text, split in documents:
        texts.append(text)
        splits.append(split)
        chars += len(text)
        if len(texts) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield texts, splits
            texts, splits, chars = [], [], 0
    if texts:
        yield texts, splits


def prepare_source(cfg: Config, src: SourceConfig, tok: Tokenizer, encoder: _Encoder) -> SourceResult:
    data_dir = cfg.data_dir
    folder = shard_dir(data_dir, src.name)
    settings = _source_settings(src, tok, cfg.data.val_fraction, source_clean_settings(cfg, src))
    cached = _cached_result(folder, src, settings)
    if cached is not None:
        return cached
    chat = _chat_tokens(src, tok)  # chat sources: the template's ids, for the loss mask
    res = SourceResult(src.name)
    next_index = _start_or_resume(data_dir, src, tok, settings, res)
    to_skip = dict(res.docs)  # documents already in kept shards, per split
    if any(next_index.values()):
        res.status = "resumed"
    writers: dict[str, ShardWriter | None] = dict.fromkeys(SPLITS)
    stats = ReadStats()
    bar = _progress(cfg, src.name)
    t0, new_tokens = time.perf_counter(), 0

    def write(splits: list[str], result) -> None:
        nonlocal new_tokens
        flat, lengths, nbytes = result
        ends = np.cumsum(lengths)
        flags = trained_flags(flat, chat, tok.eos_id) if chat else None
        for split, end, n, nb in zip(splits, ends, lengths, nbytes):
            writer = writers[split]
            if writer is None:
                writer = ShardWriter(
                    shard_prefix(data_dir, src.name, split, next_index[split]),
                    tok.vocab_size,
                    tok.hash,
                    with_mask=chat is not None,
                )
                writers[split] = writer
            mask = None if flags is None else flags[end - n : end]
            writer.add_document(flat[end - n : end], num_bytes=int(nb), mask=mask)
            res.docs[split] += 1
            res.tokens[split] += int(n)
            res.bytes[split] += int(nb)
            if writer.num_tokens >= cfg.prepare.shard_tokens:
                writer.close()
                writers[split] = None
                next_index[split] += 1
        new_tokens += int(lengths.sum())
        bar.update(len(splits))
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(
            f"{new_tokens / elapsed / 1e6:.2f}M tok/s, {new_tokens / 1e6:.1f}M tok", refresh=False
        )

    def new_documents() -> Iterator[tuple[str, str]]:
        """(text, split) of every document not already in a kept shard."""
        for doc in source_documents(cfg, src, stats):
            split = split_of(doc.id, cfg.data.val_fraction)
            if to_skip[split] > 0:
                to_skip[split] -= 1
            else:
                yield doc.text, split

    ok = False
    try:
        for texts, splits in chunked(new_documents()):
            encoder.submit(texts, splits)
            while encoder.full():
                write(*encoder.pop())
        while encoder.pending:
            write(*encoder.pop())
        for split, writer in writers.items():
            if writer is not None:
                writer.close()
                next_index[split] += 1
        ok = True
    finally:
        bar.close()
        if not ok:
            for writer in writers.values():
                if writer is not None:
                    writer.abort()
            encoder.pending.clear()
    if any(to_skip.values()):
        raise DataError(
            f"data source {src.name!r}: fewer documents than its existing shards hold (corpus changed?); "
            f"delete {folder} to rebuild"
        )
    res.skipped_records = stats.skipped
    total_docs = sum(res.docs.values())
    if total_docs == 0:
        skipped = f" ({stats.skipped} bad records skipped, e.g. {stats.examples[0]})" if stats.skipped else ""
        raise DataError(f"data source {src.name!r}: no documents in {src.path}{skipped}")
    if res.docs["train"] == 0:
        raise DataError(
            f"data source {src.name!r}: all {total_docs} documents fell into validation; lower data.val_fraction"
        )
    for split in SPLITS:
        res.shards[split] = next_index[split]
        _remove_stale(data_dir, src, split, next_index[split])
    splits = {s: {k: getattr(res, k)[s] for k in ("docs", "tokens", "bytes", "shards")} for s in SPLITS}
    _write_json(
        folder / DONE_FILE,
        {
            "settings": settings,
            "splits": splits,
            "skipped_records": stats.skipped,
            "bad_examples": stats.examples,
        },
    )
    return res


def _chat_tokens(src: SourceConfig, tok: Tokenizer) -> dict[str, int] | None:
    """{chat token: id} for a chat source (a one-line DataError when the tokenizer lacks them), else None."""
    if src.format != "chat":
        return None
    return chat_token_ids(tok, f"data source {src.name!r} (format chat), tokenizer {tok.path}")


def _progress(cfg: Config, name: str):
    from tqdm import tqdm

    return tqdm(
        desc=f"tokenize {name}",
        unit="doc",
        disable=not cfg.prepare.progress,
        mininterval=0.5,
        dynamic_ncols=True,
    )


def tokenizer_sample(cfg: Config) -> list[str]:
    """Training documents for the tokenizer, within `tokenizer.char_budget` characters.

    Each source gets a share of the budget by its mixture weight; within a source the documents
    with the smallest hash of their id are kept (the longest run in hash order that fits), which is
    a uniform sample independent of reading order. Validation documents are never used.
    """
    total_weight = sum(s.weight for s in cfg.data.sources)
    texts: list[str] = []
    for src in cfg.data.sources:
        budget = int(cfg.tokenizer.char_budget * src.weight / total_weight)
        heap: list[tuple[int, int, str]] = []  # (-hash, order, text): the largest hash is on top
        size, cutoff = 0, None
        for order, doc in enumerate(source_documents(cfg, src)):
            if split_of(doc.id, cfg.data.val_fraction) != "train":
                continue
            h = _sample_hash(src.name, doc.id)
            if cutoff is not None and h >= cutoff:
                continue
            heapq.heappush(heap, (-h, order, doc.text))
            size += len(doc.text)
            while size > budget and heap:
                neg, _, text = heapq.heappop(heap)
                size -= len(text)
                cutoff = -neg if cutoff is None else min(cutoff, -neg)
        texts.extend(text for _, _, text in sorted(heap, key=lambda item: item[1]))
    if not any(texts):
        # sentencepiece would fail with an internal error about its own trainer state.
        where = ", ".join(f"{s.name} ({s.path})" for s in cfg.data.sources)
        raise DataError(f"no text to train the tokenizer on: the train documents of {where} are all empty")
    return texts


def _announce_training(cfg: Config) -> list[str]:
    t = cfg.tokenizer
    print(
        f"tokenizer: training {t.model_type}, vocab {t.vocab_size}, on up to {t.char_budget:,} characters",
        flush=True,
    )
    return tokenizer_sample(cfg)


def _sample_hash(source: str, doc_id: str) -> int:
    digest = hashlib.blake2b(f"{source}\0{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def prepare(cfg: Config) -> Path:
    """Tokenizer, then shards of every source and split; returns the data folder. Idempotent."""
    t0 = time.perf_counter()
    data_dir = cfg.data_dir
    sources = cfg.data.sources
    if not sources:
        raise ConfigError(
            "data.sources: no sources; pick a data config (e.g. data=stdlib) or declare sources"
        )
    workers = cfg.prepare.workers or os.cpu_count() or 1
    pending = [s for s in sources if _is_pending(cfg, s)]
    for src in pending:  # fail fast on a bad path before any long work
        list_files(src)
    if not clean_sources(cfg, pending, workers):
        return data_dir  # handed to SLURM: tokenize on the next run, once the jobs have finished
    t_tok = time.perf_counter()
    tok, how = get_tokenizer(cfg.tokenizer, data_dir, lambda: _announce_training(cfg))
    print(
        f"tokenizer: {how} {data_dir / 'tokenizer.model'} (vocab {tok.vocab_size}, hash {tok.hash[:12]}, "
        f"{time.perf_counter() - t_tok:.1f} s)"
    )
    for src in pending:  # a tokenizer without the chat tokens fails before any shard is written
        _chat_tokens(src, tok)
    results = []
    encoder = _Encoder(tok, workers) if pending else None
    ok = False
    try:
        for src in sources:
            results.append(prepare_source(cfg, src, tok, encoder))
        ok = True
    finally:
        if encoder is not None:
            encoder.close(ok)
    _summary(data_dir, results, time.perf_counter() - t0, workers if pending else 0)
    write_report(cfg, results)
    return data_dir


def _is_pending(cfg: Config, src: SourceConfig) -> bool:
    """Not finished, or finished with other clean settings."""
    done = _read_settings_file(shard_dir(cfg.data_dir, src.name) / DONE_FILE)
    return done is None or done["settings"].get("clean") != source_clean_settings(cfg, src)


def _summary(data_dir: Path, results: list[SourceResult], seconds: float, workers: int) -> None:
    for r in results:
        print(
            f"  {r.name}: {r.status}; train {r.docs['train']:,} docs {r.tokens['train']:,} tokens "
            f"in {r.shards['train']} shards; val {r.docs['val']:,} docs {r.tokens['val']:,} tokens "
            f"in {r.shards['val']} shards; {r.skipped_records} bad records skipped"
        )
    docs = sum(sum(r.docs.values()) for r in results)
    tokens = sum(sum(r.tokens.values()) for r in results)
    shards = sum(sum(r.shards.values()) for r in results)
    skipped = sum(r.skipped_records for r in results)
    if all(r.status == "cached" for r in results):
        print(
            f"{data_dir}: already prepared ({docs:,} docs, {tokens:,} tokens, {shards} shards); nothing to do"
        )
        return
    print(
        f"{data_dir}: {docs:,} docs, {tokens:,} tokens, {shards} shards, {skipped} bad records skipped, "
        f"{seconds:.1f} s ({workers} worker{'s' if workers != 1 else ''})"
    )


def main(cfg: Config) -> int:
    prepare(cfg)
    return 0
