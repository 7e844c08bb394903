"""What the clean stage leaves on disk and reads back: its folder, counts and kept documents.

No datatrove here: the report and the tokenizer read a finished clean stage without it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.errors import DataError

CLEAN_DIR = "clean"
DONE_FILE = "done.json"
SETTINGS_FILE = "settings.json"
SUBMITTED_FILE = "submitted.json"


class CleanPending(Exception):
    """The clean stage of a source was handed to SLURM and has not finished: tokenizing must wait."""


@dataclass
class CleanResult:
    """What the clean stage did to one source (the report's per-source rows)."""

    name: str
    docs_in: int = 0
    chars_in: int = 0
    docs_out: int = 0
    chars_out: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    """Stage or filter (`decontaminate:<task>` per task file) -> documents it removed."""
    reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    """Filter -> the rule that removed a document -> count (datatrove's reason names)."""
    skipped_records: int = 0
    tasks: int = 1
    seconds: float = 0.0
    status: str = "done"
    """done | resumed (after finished tasks of an earlier run) | cached (already complete)."""


def clean_dir(data_dir: Path, name: str) -> Path:
    return Path(data_dir) / CLEAN_DIR / name


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def load_result(data_dir: Path, name: str) -> CleanResult | None:
    """The counts of a finished clean stage (None when the source was not cleaned or is unfinished)."""
    done = read_json(clean_dir(data_dir, name) / DONE_FILE)
    if done is None or not isinstance(done.get("result"), dict):
        return None
    known = {f.name for f in dataclasses.fields(CleanResult)}
    return CleanResult(**{k: v for k, v in done["result"].items() if k in known})


def read_shard(path: Path) -> Iterator[tuple[str, str]]:
    """(id, text) of each document in a file written by the clean stage."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                record = json.loads(line)
                yield record["id"], record["text"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(
            f"{path}: unreadable clean output ({err}); delete {path.parent.parent} to clean again"
        ) from None
