"""Typed configuration of corpora, the tokenizer and shard preparation."""

from __future__ import annotations

from dataclasses import dataclass, field


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
