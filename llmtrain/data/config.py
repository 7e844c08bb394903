"""Typed configuration of corpora, the tokenizer and shard preparation."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmtrain.errors import check, check_choice


@dataclass
class SourceConfig:
    """One corpus in the mixture."""

    name: str = "???"
    """Short unique name; used in shard folder names and per-source metrics."""
    path: str = "???"
    """A file, a folder, or a glob. For `format: stdlib` this is ignored."""
    format: str = "txt"
    """txt | jsonl (also .jsonl.gz) | parquet | stdlib."""
    text_field: str = "text"
    """Field that holds the document text in jsonl / parquet records."""
    separator: str | None = None
    """txt only: split each file into documents on this string; None = one document per file."""
    weight: float = 1.0
    """Relative sampling weight in the training mixture (need not sum to 1)."""


@dataclass
class DataConfig:
    """Which corpora to read and where their tokenizer and shards live."""

    name: str | None = None
    """Defaults to the chosen `data=<name>` config."""
    dir: str | None = None
    """Folder for the tokenizer and shards; defaults to `data/<name>`."""
    sources: list[SourceConfig] = field(default_factory=list)
    val_fraction: float = 0.01
    """Share of documents held out for validation, chosen by a stable hash of each document's id."""
    on_bad_record: str = "fail"
    """fail | skip: what to do with an undecodable or malformed record (skips are counted)."""
    seed: int = 1234
    """Seed of the mixture's sample order."""
    verify: str = "full"
    """Shard integrity check before training: full (checksums and token ids, split across ranks),
    size (headers and file sizes only) or off."""
    prefetch: int = 2
    """Train micro-batches read ahead on a background thread (pinned memory on GPU); 0 reads each
    in the step."""


@dataclass
class TokenizerConfig:
    """The sentencepiece tokenizer trained on (a sample of) the corpus, unless `path` is given."""

    path: str | None = None
    """An existing sentencepiece .model to use instead of training one."""
    vocab_size: int = 8192
    model_type: str = "bpe"
    """bpe | unigram (unigram trains about 10x slower). Either way text is kept lossless: no
    normalization, whitespace and newlines as pieces, digits split, bytes as fallback."""
    char_budget: int = 20_000_000
    """Characters of training text the tokenizer learns from: whole documents, sampled by a stable hash
    of their ids and shared among sources by weight (20M: about 5 s of BPE training on 2 cores)."""
    byte_fallback: bool = True
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 3
    user_defined_symbols: list[str] = field(default_factory=list)
    threads: int | None = None
    """Training threads; None = all cores."""


@dataclass
class PrepareConfig:
    """Parallel tokenization into shards."""

    workers: int | None = None
    """Worker processes; None = all cores."""
    shard_tokens: int = 50_000_000
    """Tokens per shard file (a shard closes at the first document end past this size)."""
    progress: bool = True


FORMATS = ("txt", "jsonl", "parquet", "stdlib")
MODEL_TYPES = ("bpe", "unigram")
BAD_RECORD_ACTIONS = ("fail", "skip")
VERIFY_MODES = ("full", "size", "off")


def check_data_config(data: DataConfig) -> None:
    """Raise ConfigError naming the first `data.*` value that cannot work."""
    check_choice(data.on_bad_record, BAD_RECORD_ACTIONS, "data.on_bad_record")
    check_choice(data.verify, VERIFY_MODES, "data.verify")
    check(data.prefetch >= 0, "data.prefetch", f"must be >= 0, got {data.prefetch}")
    check(0 <= data.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {data.val_fraction}")
    names = [s.name for s in data.sources]
    check(len(names) == len(set(names)), "data.sources", f"source names must be unique, got {names}")
    for i, src in enumerate(data.sources):
        check(src.weight > 0, f"data.sources[{i}].weight", f"must be positive, got {src.weight}")
        check_choice(src.format, FORMATS, f"data.sources[{i}].format")


def check_tokenizer_config(tok: TokenizerConfig) -> None:
    check_choice(tok.model_type, MODEL_TYPES, "tokenizer.model_type")
    check(tok.vocab_size >= 8, "tokenizer.vocab_size", f"must be at least 8, got {tok.vocab_size}")
    check(tok.char_budget > 0, "tokenizer.char_budget", f"must be positive, got {tok.char_budget}")
    ids = {"unk_id": tok.unk_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    for key in ("unk_id", "eos_id"):
        check(ids[key] >= 0, f"tokenizer.{key}", f"must be >= 0 (documents end with EOS), got {ids[key]}")
    used = {k: v for k, v in ids.items() if v >= 0}
    check(len(set(used.values())) == len(used), "tokenizer", f"special ids must differ, got {used}")
    for key, value in used.items():
        check(
            value < tok.vocab_size,
            f"tokenizer.{key}",
            f"{value} is not below tokenizer.vocab_size={tok.vocab_size}",
        )


def check_prepare_config(prep: PrepareConfig) -> None:
    workers = prep.workers
    check(workers is None or workers >= 1, "prepare.workers", f"must be positive, got {workers}")
    check(prep.shard_tokens >= 1, "prepare.shard_tokens", f"must be positive, got {prep.shard_tokens}")
