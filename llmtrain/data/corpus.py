"""Readers that turn a source (txt / jsonl / jsonl.gz / parquet / the Python stdlib / chat) into documents.

Every document has a stable id (its file's path relative to the source root, plus a line or row
number where a file holds many documents), and its train / validation split is a pure function of
that id, so the split never changes when files are added elsewhere or read in another order.
Files are visited in sorted order, so the document stream itself is deterministic.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmtrain.data.config import SourceConfig
from llmtrain.errors import DataError

SPLITS = ("train", "val")
# what a folder is searched for (a file named directly may have any name)
_EXTENSIONS = {"jsonl": (".jsonl", ".jsonl.gz"), "chat": (".jsonl", ".jsonl.gz"), "parquet": (".parquet",)}
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    id: str
    """Stable identity: `<relative path>`, `<relative path>:<line>` or `<relative path>#<index>`."""
    text: str


@dataclass
class ReadStats:
    """Bad records skipped under `data.on_bad_record=skip` (a few kept as examples for the report)."""

    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def skip(self, where: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(where)

    def bad(self, where: str, problem: str, skip: bool) -> None:
        """Count a bad record when skipping them, else stop with one line naming it."""
        if not skip:
            raise DataError(f"{where}: {problem}; data.on_bad_record=skip skips such records") from None
        self.skip(where)


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' for a stable pseudo-random `val_fraction` of ids, else 'train' (independent of order)."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2.0**64 < val_fraction else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(
    root: Path, suffixes: tuple[str, ...] | None, skip_dirs: frozenset[str] = frozenset()
) -> list[Path]:
    """Files under `root` (sorted, no hidden files, no symlinked folders), optionally by suffix."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        for name in filenames:
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def list_files(source: SourceConfig) -> tuple[Path, list[Path]]:
    """(root, files) of a source: the files in reading order and the folder their ids are relative to.

    Raises DataError for a missing path, a glob matching nothing, or a folder without matching files.
    """
    where = f"data source {source.name!r}"
    if source.format == "stdlib":
        root = stdlib_root()
        if not root.is_dir():
            raise DataError(f"{where}: Python standard library not found at {root}")
        return root, _walk(root, (".py",), _STDLIB_SKIP)
    suffixes = _EXTENSIONS.get(source.format)
    path = os.path.expanduser(source.path)
    if glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{where}: glob {source.path!r} matches no files")
        # ids are relative to the glob's fixed leading folders, so they survive moving the corpus
        fixed = []
        for part in Path(path).parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        root = Path(*fixed) if fixed else Path(".")
        return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())
    root = Path(path)
    if root.is_file():
        return root.parent, [root]
    if root.is_dir():
        files = _walk(root, suffixes)
        if not files:
            kinds = f" {'/'.join(suffixes)}" if suffixes else ""
            raise DataError(f"{where}: folder {source.path} holds no{kinds} files")
        return root, files
    raise DataError(f"{where}: path {source.path} does not exist")


def iter_documents(
    source: SourceConfig, *, on_bad_record: str = "fail", stats: ReadStats | None = None
) -> Iterator[Document]:
    """All non-empty documents of a source, in a deterministic order.

    A bad record (undecodable bytes, malformed JSON, a missing or non-string text field) raises a
    DataError naming its file and line, or with `on_bad_record="skip"` is counted in `stats`.
    """
    root, files = list_files(source)
    stats = stats if stats is not None else ReadStats()
    skip = on_bad_record == "skip"
    for path in files:
        rel = path.relative_to(root).as_posix()
        if source.format == "stdlib":
            yield from _read_stdlib(path, rel)
        elif source.format == "txt":
            yield from _read_txt(path, rel, source.separator, skip, stats)
        elif source.format == "jsonl":
            yield from _read_jsonl(path, rel, source.text_field, skip, stats)
        elif source.format == "chat":
            yield from _read_jsonl(path, rel, source.text_field, skip, stats, chat=True)
        elif source.format == "parquet":
            yield from _read_parquet(path, rel, source.text_field, skip, stats)
        else:
            raise DataError(f"data source {source.name!r}: unknown format {source.format!r}")


def _read_stdlib(path: Path, rel: str) -> Iterator[Document]:
    # The stdlib holds a few deliberately non-UTF-8 test files: not source code worth learning.
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return
    if text.strip():
        yield Document(rel, text)


def _line_of(data: bytes, byte_pos: int) -> int:
    return data.count(b"\n", 0, byte_pos) + 1


def _read_txt(
    path: Path, rel: str, separator: str | None, skip: bool, stats: ReadStats
) -> Iterator[Document]:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        stats.bad(f"{path}:{_line_of(data, err.start)}", f"not valid UTF-8 (byte {err.start})", skip)
        return
    parts = [text] if not separator else text.split(separator)
    for i, part in enumerate(parts):
        if part.strip():
            yield Document(rel if separator is None else f"{rel}#{i}", part)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _read_jsonl(
    path: Path, rel: str, text_field: str, skip: bool, stats: ReadStats, chat: bool = False
) -> Iterator[Document]:
    """Records of a JSONL file; with `chat`, conversations (`{"messages": [...]}`) rendered as text
    by the chat template (llmtrain/data/chat_template.py)."""
    gz = path.name.endswith(".gz")
    try:
        f = gzip.open(path, "rb") if gz else open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    lineno = 0
    try:
        with f:
            for lineno, raw in enumerate(f, 1):  # noqa: B007 (lineno is reported after the loop)
                if not raw.strip():
                    continue
                text, problem = _parse_chat(raw) if chat else _parse_record(raw, text_field)
                if problem is not None:
                    stats.bad(f"{path}:{lineno}", problem, skip)
                elif text.strip():
                    yield Document(f"{rel}:{lineno}", text)
    except (OSError, EOFError, zlib.error) as err:
        # a truncated or corrupt .gz: the rest of the file is unreadable
        problem = f"corrupt or truncated file ({type(err).__name__}: {err})"
        stats.bad(f"{path}:{lineno + 1}", problem, skip)


def _parse_chat(raw: bytes) -> tuple[str, str | None]:
    """(the conversation rendered by the chat template, None) or ("", what is wrong with this line)."""
    from llmtrain.data.chat_template import conversation_problem, render_text

    record, problem = _json_object(raw)
    if problem is not None:
        return "", problem
    if "messages" not in record:
        fields = sorted(record)[:8]
        return "", f"no field 'messages' (a chat record is {{\"messages\": [...]}}; fields here: {fields})"
    problem = conversation_problem(record["messages"])
    if problem is not None:
        return "", problem
    return render_text(record["messages"]), None


def _json_object(raw: bytes) -> tuple[dict, str | None]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return {}, f"not valid UTF-8 (byte {err.start} of the line)"
    except json.JSONDecodeError as err:
        return {}, f"malformed JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return {}, f"expected a JSON object, got {type(record).__name__}"
    return record, None


def _parse_record(raw: bytes, text_field: str) -> tuple[str, str | None]:
    """(text, None) or ("", what is wrong with this line)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return "", f"not valid UTF-8 (byte {err.start} of the line)"
    except json.JSONDecodeError as err:
        return "", f"malformed JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return "", f"expected a JSON object, got {type(record).__name__}"
    if text_field not in record:
        return "", f"no field {text_field!r} (set the source's text_field; fields here: {sorted(record)[:8]})"
    text = record[text_field]
    if not isinstance(text, str):
        return "", f"field {text_field!r} is {type(text).__name__}, not a string"
    return text, None


def _read_parquet(path: Path, rel: str, text_field: str, skip: bool, stats: ReadStats) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading parquet needs pyarrow; install it with `pip install 'llmtrain[parquet]'`"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own error types for a non-parquet file
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(
            f"{path}: no column {text_field!r} (set the source's text_field; columns: {pf.schema_arrow.names[:8]})"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                stats.bad(
                    f"{path}:row {row}", f"column {text_field!r} is {type(text).__name__}, not a string", skip
                )
            elif text.strip():
                yield Document(f"{rel}#{row}", text)
            row += 1
