"""A decontamination index built from local evaluation task files, for datatrove's n-gram filter.

datatrove's own indexer takes its tasks from lighteval (and downloads them); here the tasks are the
files and folders listed in `clean.decontaminate`: JSONL / JSON records (every string field, or the
fields in `clean.decont.fields`) or plain text. The index is datatrove's format, one
`<task>.index.hashes` file of uint64 n-gram hashes per task file, so `NGramsDecontFilter` reads it and
names the task of every removal. Imported only when cleaning is on.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llmtrain.data.config import DecontConfig
from llmtrain.errors import DataError

TASK_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".txt")


def task_files(entries: list[str], key: str) -> list[tuple[str, Path]]:
    """(task name, file) for every task file listed: a file is its own task (named by its stem), a
    folder holds one task per file (named `<folder>/<relative path without suffix>`)."""
    found: list[tuple[str, Path]] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_file():
            found.append((_stem(path.name), path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TASK_SUFFIXES))
            if not files:
                raise DataError(f"{key}: folder {entry} holds no {'/'.join(TASK_SUFFIXES)} task files")
            for p in files:
                rel = p.relative_to(path).as_posix()
                found.append((f"{path.name}/{_stem(rel)}", p))
        else:
            raise DataError(f"{key}: task file or folder {entry} does not exist")
    names: dict[str, int] = {}
    unique = []
    for name, path in found:  # the same stem listed twice: keep both, told apart by a number
        names[name] = names.get(name, 0) + 1
        unique.append((name if names[name] == 1 else f"{name}_{names[name]}", path))
    return unique


def _stem(name: str) -> str:
    for suffix in TASK_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def task_texts(path: Path, fields: list[str]) -> Iterator[str]:
    """The text of each record of a task file (its strings joined by newlines), or the whole file."""
    name = path.name
    try:
        if name.endswith(".txt"):
            yield path.read_text(encoding="utf-8")
            return
        if name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            records = data if isinstance(data, list) else [data]
            for record in records:
                yield "\n".join(_strings(record, fields))
            return
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON ({err.msg}) in a decontamination task file"
                    ) from None
                yield "\n".join(_strings(record, fields))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read decontamination task file ({err})") from None


def _strings(value, fields: list[str]) -> list[str]:
    if fields and isinstance(value, dict):
        value = [value[f] for f in fields if f in value]
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [s for item in value for s in _strings(item, [])]
    return []


def build_index(entries: list[str], cfg: DecontConfig, out_dir: Path, key: str) -> dict[str, int]:
    """Write one hash file per task into `out_dir`; returns task name -> number of distinct n-grams."""
    from datatrove.utils.hashing import HashConfig, create_hash_func
    from datatrove.utils.text import ngrams, simplify_text

    from llmtrain.data.clean_steps import WORDS

    hash_func = create_hash_func(HashConfig())
    counts = {}
    for name, path in task_files(entries, key):
        hashes: set[int] = set()
        for text in task_texts(path, cfg.fields):
            words = WORDS.word_tokenize(simplify_text(text))
            hashes.update(hash_func(" ".join(g)) for g in ngrams(words, cfg.n_grams))
        target = out_dir / f"{name}.index.hashes"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.array(sorted(hashes), dtype="<u8").tofile(target)
        counts[name] = len(hashes)
    return counts
