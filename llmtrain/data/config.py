"""Typed configuration of corpora, the tokenizer and shard preparation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmtrain.errors import ConfigError, check, check_choice


@dataclass
class SourceConfig:
    """One corpus in the mixture."""

    name: str = "???"
    """Short unique name; used in shard folder names and per-source metrics."""
    path: str = "???"
    """A file, a folder, or a glob. For `format: stdlib` this is ignored."""
    format: str = "txt"
    """txt | jsonl (also .jsonl.gz) | parquet | stdlib | chat. chat: JSONL (or .jsonl.gz), one
    conversation per line, `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`,
    rendered by the chat template; training learns the assistant tokens only (docs/finetune.md)."""
    text_field: str = "text"
    """Field that holds the document text in jsonl / parquet records."""
    separator: str | None = None
    """txt only: split each file into documents on this string; None = one document per file."""
    weight: float = 1.0
    """Relative sampling weight in the training mixture (need not sum to 1)."""
    clean: dict[str, Any] | None = None
    """Keys of `data.clean` that differ for this source, e.g. {dedup: exact, filters: []}."""


@dataclass
class GopherQualityConfig:
    """Gopher's quality rules (Rae et al. 2021, appendix A1), published thresholds; null turns a rule off."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    """`#` and ellipses per word."""
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    """Share of words with at least one letter."""
    min_stop_words: int | None = 2
    stop_words: list[str] = field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"]
    )


@dataclass
class GopherRepetitionConfig:
    """Gopher's repetition rules (Rae et al. 2021, table A1): a document goes when a share exceeds its key."""

    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_2_gram_frac: float | None = 0.2
    """Characters in the most frequent word 2-gram, as a share of the document."""
    top_3_gram_frac: float | None = 0.18
    top_4_gram_frac: float | None = 0.16
    dup_5_gram_frac: float | None = 0.15
    """Characters in repeated word 5-grams, as a share of the document."""
    dup_6_gram_frac: float | None = 0.14
    dup_7_gram_frac: float | None = 0.13
    dup_8_gram_frac: float | None = 0.12
    dup_9_gram_frac: float | None = 0.11
    dup_10_gram_frac: float | None = 0.10


@dataclass
class C4FilterConfig:
    """C4's rules (Raffel et al. 2020): lines are judged one by one, documents by what is left."""

    min_num_sentences: int = 5
    """Documents with fewer sentences in their kept lines go (-1: off)."""
    min_words_per_line: int = 3
    max_word_length: int = 1000
    """Lines with a longer word are not kept (-1: off)."""
    filter_no_terminal_punct: bool = True
    """Lines that do not end in . ? ! " or ' are not kept."""
    remove_citations: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    """Lines about cookies or terms of use are not kept."""
    split_paragraph: bool = True
    """Judge newline-separated lines (C4); false: sentences."""
    remove_lines: bool = False
    """Also cut the lines C4 does not keep out of the documents it keeps (C4 as published). Off: a
    kept document is kept byte for byte."""


@dataclass
class FineWebFilterConfig:
    """FineWeb's rules (Penedo et al. 2024), published thresholds."""

    line_punct_thr: float = 0.12
    """Documents with fewer lines ending in punctuation than this share go."""
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    """Documents with more lines of at most `short_line_length` characters than this share go."""
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    """Characters in duplicated lines, as a share of the document."""
    new_line_ratio: float = 0.3
    """Newlines per word."""


@dataclass
class ExactDedupConfig:
    normalize: bool = True
    """Hash the text lowercased, without punctuation and with whitespace collapsed (else the raw text)."""


@dataclass
class NearDedupConfig:
    """MinHash + LSH (datatrove's MinhashConfig): documents are sets of word n-gram shingles."""

    n_grams: int = 5
    """Shingle size in words."""
    num_buckets: int = 14
    """LSH bands; two documents are candidates when all hashes of one band agree."""
    hashes_per_bucket: int = 8
    """Rows per band (num_buckets x hashes_per_bucket MinHash values per document)."""
    threshold: float | None = None
    """Jaccard similarity to catch: when set, the bands and rows are chosen for it within the same
    number of hashes (least false positives + negatives); null: (1/bands)^(1/rows), 0.72 for 14x8."""
    seed: int = 1


@dataclass
class DecontConfig:
    n_grams: int = 13
    """A document sharing a run of this many (normalized) words with a task file goes."""
    fields: list[str] = field(default_factory=list)
    """JSON fields of task records to read; empty: every string (and list of strings) in a record."""


@dataclass
class LanguageConfig:
    """Language identification with a local fastText model (nothing is downloaded)."""

    languages: list[str] = field(default_factory=list)
    """Labels to keep, as the model writes them (`en` for lid.176, `eng_Latn` for GlotLID); empty: off."""
    model: str | None = None
    """Path of the fastText .bin model (e.g. lid.176.bin)."""
    min_score: float = 0.65


@dataclass
class CleanConfig:
    """The clean stage before tokenization (docs/cleaning.md): length, language and quality filters,
    decontamination, then exact and near deduplication within each source, on datatrove."""

    enabled: bool = True
    """false: skip the stage for this source (or mixture) whatever else is set."""
    dedup: str = "none"
    """none | exact | near | both (exact first)."""
    filters: list[str] = field(default_factory=list)
    """Quality filters in the order they run: gopher_quality, gopher_repetition, c4, fineweb."""
    min_chars: int = 0
    max_chars: int | None = None
    decontaminate: list[str] = field(default_factory=list)
    """Evaluation task files or folders (JSONL, JSON, text); see `decont`."""
    tasks: int = 16
    """datatrove tasks per source (at most one per file): the output depends on it, not on the
    worker count (`prepare.workers`)."""
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4: C4FilterConfig = field(default_factory=C4FilterConfig)
    fineweb: FineWebFilterConfig = field(default_factory=FineWebFilterConfig)
    exact: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near: NearDedupConfig = field(default_factory=NearDedupConfig)
    decont: DecontConfig = field(default_factory=DecontConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)

    @property
    def active(self) -> bool:
        """Whether the stage does anything (the default, off, costs nothing and imports nothing)."""
        return self.enabled and bool(
            self.dedup != "none"
            or self.filters
            or self.min_chars > 0
            or self.max_chars is not None
            or self.decontaminate
            or self.language.languages
        )


@dataclass
class DataConfig:
    """Which corpora to read and where their tokenizer and shards live."""

    name: str | None = None
    """Defaults to the chosen `data=<name>` config."""
    dir: str | None = None
    """Folder for the tokenizer and shards; defaults to `data/<name>`."""
    sources: list[SourceConfig] = field(default_factory=list)
    clean: CleanConfig = field(default_factory=CleanConfig)
    """The clean stage for every source (off by default); a source's `clean` overrides keys of it."""
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
    user_defined_symbols: list[str] = field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    )
    """Strings kept as single pieces. By default the chat template's tokens (llmtrain/data/chat_template.py),
    so every pretrained run can be fine-tuned on conversations; [] reserves none."""
    threads: int | None = None
    """Training threads; None = all cores."""


@dataclass
class SlurmConfig:
    """`prepare.executor=slurm`: the clean stage as datatrove SLURM job arrays (docs/cleaning.md)."""

    partition: str | None = None
    time: str = "12:00:00"
    """Time limit of each job (sbatch --time)."""
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    job_name: str = "llmtrain-clean"
    qos: str | None = None
    max_concurrent: int | None = None
    """Array tasks running at once; None = no limit."""
    env_command: str | None = None
    """Shell line run before each task, e.g. `source /shared/venv/bin/activate`."""
    sbatch_args: dict[str, str] = field(default_factory=dict)
    """Further `#SBATCH --key=value` lines, e.g. {account: myproj}."""


@dataclass
class RayConfig:
    """`prepare.executor=ray`: the clean stage as Ray tasks (needs `pip install -e .[ray]`)."""

    address: str | None = None
    """Cluster address for ray.init (e.g. `auto`); None: a private local Ray runtime of
    `prepare.workers` CPUs, started for the clean stage and shut down after it."""
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0


@dataclass
class PrepareConfig:
    """Parallel tokenization into shards."""

    workers: int | None = None
    """Worker processes; None = all cores."""
    shard_tokens: int = 50_000_000
    """Tokens per shard file (a shard closes at the first document end past this size)."""
    progress: bool = True
    executor: str = "local"
    """Where the clean stage runs: local (`workers` processes), slurm or ray (docs/cleaning.md)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)


FORMATS = ("txt", "jsonl", "parquet", "stdlib", "chat")
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
    check_clean_config(data.clean, "data.clean")
    for i, src in enumerate(data.sources):
        clean = source_clean(data, i)
        if src.clean:
            check_clean_config(clean, f"data.sources[{i}].clean")
        check(
            src.format != "chat" or not clean.active,
            f"data.sources[{i}].clean",
            "conversations are not prose: turn cleaning off for a chat source with clean: {enabled: false}",
        )


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
    check_choice(prep.executor, EXECUTORS, "prepare.executor")
    if prep.executor == "slurm":
        check(bool(prep.slurm.partition), "prepare.slurm.partition", "required with prepare.executor=slurm")
    for key in ("slurm.cpus_per_task", "slurm.mem_per_cpu_gb", "ray.cpus_per_task", "ray.mem_per_cpu_gb"):
        section, name = key.split(".")
        value = getattr(getattr(prep, section), name)
        check(value > 0, f"prepare.{key}", f"must be positive, got {value}")
    jobs = prep.slurm.max_concurrent
    check(jobs is None or jobs >= 1, "prepare.slurm.max_concurrent", f"must be positive or null, got {jobs}")


CLEAN_FILTERS = ("gopher_quality", "gopher_repetition", "c4", "fineweb")
DEDUP_MODES = ("none", "exact", "near", "both")
EXECUTORS = ("local", "slurm", "ray")
_OFF_BY_MINUS_ONE = ("min_num_sentences", "min_words_per_line", "max_word_length")


def source_clean(data: DataConfig, index: int) -> CleanConfig:
    """The clean settings of `data.sources[index]`: its `clean` mapping merged over the mixture's
    `data.clean` (a ConfigError names the source's key that does not fit the schema)."""
    src = data.sources[index]
    if not src.clean:
        return data.clean
    import difflib

    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    key = f"data.sources[{index}].clean"
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(data.clean), src.clean))
    except ConfigKeyError as err:
        name = str(err.full_key or err.key)
        leaf = name.rsplit(".", 1)[-1]
        known = [f.name for f in dataclasses.fields(_schema_at(name))]
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{key}.{name}: no such key in the clean schema{hint}") from None
    except (OmegaConfBaseException, ValueError) as err:
        where = f"{key}.{err.full_key}" if getattr(err, "full_key", None) else key
        raise ConfigError(f"{where}: {str(err).splitlines()[0]}") from None


def _schema_at(dotted: str) -> type:
    """The dataclass that holds the last key of `dotted` (a path below CleanConfig)."""
    import typing

    cls = CleanConfig
    for part in dotted.split(".")[:-1]:
        kind = typing.get_type_hints(cls).get(part)
        if not dataclasses.is_dataclass(kind):
            break
        cls = kind
    return cls


def check_clean_config(c: CleanConfig, key: str) -> None:
    """Raise ConfigError naming the first clean setting under `key` that cannot work."""
    check_choice(c.dedup, DEDUP_MODES, f"{key}.dedup")
    for name in c.filters:
        check(
            name in CLEAN_FILTERS,
            f"{key}.filters",
            f"unknown filter {name!r}; known: {', '.join(CLEAN_FILTERS)}",
        )
    check(len(set(c.filters)) == len(c.filters), f"{key}.filters", f"lists a filter twice: {list(c.filters)}")
    check(c.min_chars >= 0, f"{key}.min_chars", f"must be >= 0, got {c.min_chars}")
    mx = c.max_chars
    check(
        mx is None or mx > c.min_chars, f"{key}.max_chars", f"must be above min_chars={c.min_chars}, got {mx}"
    )
    check(c.tasks >= 1, f"{key}.tasks", f"must be positive, got {c.tasks}")
    for section in ("gopher_quality", "gopher_repetition", "c4", "fineweb"):
        _check_thresholds(getattr(c, section), f"{key}.{section}")
    g = c.gopher_quality
    for low, high in (("min_doc_words", "max_doc_words"), ("min_avg_word_length", "max_avg_word_length")):
        lo, hi = getattr(g, low), getattr(g, high)
        check(
            lo is None or hi is None or lo <= hi, f"{key}.gopher_quality.{low}", f"{lo} is above {high}={hi}"
        )
    n = c.near
    for name in ("n_grams", "num_buckets", "hashes_per_bucket"):
        check(getattr(n, name) >= 1, f"{key}.near.{name}", f"must be positive, got {getattr(n, name)}")
    t = n.threshold
    check(t is None or 0 < t < 1, f"{key}.near.threshold", f"must be in (0, 1) or null, got {t}")
    check(c.decont.n_grams >= 1, f"{key}.decont.n_grams", f"must be positive, got {c.decont.n_grams}")
    lang = c.language
    check(0 <= lang.min_score <= 1, f"{key}.language.min_score", f"must be in [0, 1], got {lang.min_score}")
    check(
        not lang.languages or bool(lang.model),
        f"{key}.language.model",
        "language identification needs a local fastText model file (lid.176.bin or GlotLID's model.bin); "
        "set its path (nothing is downloaded at run time) or leave language.languages empty",
    )


def _check_thresholds(section, key: str) -> None:
    """Counts must not be negative (-1 turns some C4 rules off); shares must lie in [0, 1]."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low = -1 if f.name in _OFF_BY_MINUS_ONE else 0
        check(value >= low, f"{key}.{f.name}", f"must be >= {low}, got {value}")
        if f.name.endswith(("_frac", "_ratio", "_thr")):
            check(value <= 1, f"{key}.{f.name}", f"is a share: must be in [0, 1], got {value}")
