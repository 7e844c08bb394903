"""The datatrove pipeline steps of the clean stage that datatrove does not ship in a form we can use.

Imported only when cleaning is on (it imports datatrove). Every step here is picklable, because
datatrove sends the pipeline to worker processes, SLURM array tasks or Ray workers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

from datatrove.data import Document as DtDocument
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import C4QualityFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.text import TERMINAL_PUNCTUATION, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer, strip_strings

from llmtrain.data import corpus
from llmtrain.data.clean_state import read_shard
from llmtrain.data.config import SourceConfig
from llmtrain.data.corpus import ReadStats
from llmtrain.errors import DataError

# A word is a run of letters/digits (with inner - or '), anything else that is not space is a symbol.
_WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]+")
_TERMINAL = re.escape("".join(sorted(TERMINAL_PUNCTUATION)))
# A sentence runs to terminal punctuation (and closing quotes) before a space, or to the line's end.
_SENTENCE = re.compile(rf"[^\n]+?(?:[{_TERMINAL}]+[\"'”’)]*(?=\s|$)|(?=\n)|$)")


class OfflineWordTokenizer(WordTokenizer):
    """Words and sentences by regular expressions: nothing to load, nothing to download.

    datatrove's English tokenizer is spaCy's (not installed with datatrove[processing]) or NLTK's punkt
    (whose data NLTK would have to download); its rules count words and sentences only roughly anyway.
    """

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings(m.group(0) for m in _SENTENCE.finditer(text))

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for m in _SENTENCE.finditer(text):
            if m.group(0).strip():
                spans.append((m.start(), m.end()))
        return spans or [(0, len(text))]


WORDS = OfflineWordTokenizer()


def read_file(src: SourceConfig, root: Path, path: Path, skip: bool, stats: ReadStats):
    """The documents of one file of a source, with the ids `iter_documents` gives them."""
    rel = path.relative_to(root).as_posix()
    if src.format == "stdlib":
        return corpus._read_stdlib(path, rel)
    if src.format == "txt":
        return corpus._read_txt(path, rel, src.separator, skip, stats)
    if src.format == "jsonl":
        return corpus._read_jsonl(path, rel, src.text_field, skip, stats)
    if src.format == "parquet":
        return corpus._read_parquet(path, rel, src.text_field, skip, stats)
    raise DataError(f"data source {src.name!r}: format {src.format!r} cannot be cleaned")


class SourceReader(PipelineStep):
    """Task r reads the r-th contiguous block of the source's files, so the tasks' outputs, taken in
    rank order, keep the corpus order."""

    type = "📖 - READER"
    name = "llmtrain source"

    def __init__(self, src: SourceConfig, root: str, blocks: list[list[str]], on_bad_record: str):
        super().__init__()
        self.src, self.root, self.blocks, self.skip = src, root, blocks, on_bad_record == "skip"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        stats = ReadStats()
        root = Path(self.root)
        for name in self.blocks[rank]:
            for doc in read_file(self.src, root, Path(name), self.skip, stats):
                self.stat_update("docs_in")
                self.stat_update("chars_in", value=len(doc.text))
                yield DtDocument(text=doc.text, id=doc.id)
        self.stat_update("skipped_records", value=stats.skipped)


class ShardWriter(PipelineStep):
    """Writes each document that reaches it to `<folder>/<rank>.jsonl` (always created, even empty,
    so that the next stage's task r finds exactly the file of task r) and passes it on."""

    type = "💽 - WRITER"
    name = "llmtrain jsonl"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data, rank: int = 0, world_size: int = 1):
        path = Path(self.folder) / f"{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        # ASCII escapes keep any string (lone surrogates too) exact through the round trip
        with open(path, "w", encoding="ascii") as f:
            for doc in data:
                f.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
                self.stat_update("docs_out")
                self.stat_update("chars_out", value=len(doc.text))
                yield doc


class ShardReader(PipelineStep):
    """Task r reads `<folder>/<rank>.jsonl` of the previous stage."""

    type = "📖 - READER"
    name = "llmtrain jsonl"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for doc_id, text in read_shard(Path(self.folder) / f"{rank:05d}.jsonl"):
            yield DtDocument(text=text, id=doc_id)


class LengthFilter(BaseFilter):
    name = "length"

    def __init__(self, min_chars: int, max_chars: int | None):
        super().__init__()
        self.min_chars, self.max_chars = min_chars, max_chars

    def filter(self, doc):
        if len(doc.text) < self.min_chars:
            return False, "too_short"
        if self.max_chars is not None and len(doc.text) > self.max_chars:
            return False, "too_long"
        return True


class KeepTextC4Filter(C4QualityFilter):
    """C4's document decision; unless `remove_lines`, the kept document keeps its original text."""

    def __init__(self, remove_lines: bool, **kwargs):
        super().__init__(**kwargs)
        self.remove_lines = remove_lines

    def filter(self, doc):
        text = doc.text
        result = super().filter(doc)
        if not self.remove_lines:
            doc.text = text
        return result


class FastTextLanguageFilter(BaseFilter):
    """Keeps documents whose most likely label (from a local fastText model) is one of `languages`
    with at least `min_score`. datatrove's own filter fetches its model from the Hub."""

    name = "language"

    def __init__(self, model_path: str, languages: list[str], min_score: float):
        super().__init__()
        self.model_path, self.languages, self.min_score = model_path, set(languages), min_score
        self._model = None

    def filter(self, doc):
        if self._model is None:
            import fasttext

            self._model = fasttext.load_model(self.model_path)
        labels, scores = self._model.predict(doc.text.replace("\n", " "), k=1)
        label = labels[0].removeprefix("__label__") if labels else ""
        if label in self.languages and float(scores[0]) >= self.min_score:
            return True
        return False, f"not_{'_'.join(sorted(self.languages))}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_model"] = None  # the model is loaded again in each worker
        return state


def normalized_text(doc) -> str:
    """Exact dedup key: lowercased, punctuation and digits normalized, whitespace collapsed."""
    return simplify_text(doc.text)


def raw_text(doc) -> str:
    return doc.text


def _file_only_task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    """datatrove's per-task log file, without its INFO lines on the console (errors still show)."""
    from loguru import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    fmt = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"
    logger.add(sys.__stderr__, level="ERROR", format=fmt)
    logger.add(logfile, level="DEBUG", format=fmt)
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _close_task_logger(logfile) -> None:
    quiet_console()
    logfile.close()


def quiet_console() -> None:
    """datatrove's console output down to warnings (LLMTRAIN_DEBUG=1 keeps all of it)."""
    if os.environ.get("LLMTRAIN_DEBUG"):
        return
    from loguru import logger

    logger.remove()
    logger.add(sys.__stderr__, level="WARNING", format="datatrove {level}: {message}")


def _run_quietly(run, rank: int, local_rank: int, node_rank: int, base=None):
    """`base`: the module whose task-logger names the executor calls (datatrove's Ray executor
    imports its own copies)."""
    if base is None:
        import datatrove.executor.base as base

    if os.environ.get("LLMTRAIN_DEBUG"):
        return run(rank, local_rank, node_rank)
    saved = base.add_task_logger, base.close_task_logger
    base.add_task_logger, base.close_task_logger = _file_only_task_logger, _close_task_logger
    try:
        # datatrove's dedup steps draw tqdm bars on stderr; errors still reach the console (the
        # loggers write to the process's own stderr) and exceptions propagate
        with contextlib.redirect_stderr(io.StringIO()):
            return run(rank, local_rank, node_rank)
    finally:
        base.add_task_logger, base.close_task_logger = saved


class LocalExecutor(LocalPipelineExecutor):
    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        return _run_quietly(super()._run_for_rank, rank, local_rank, node_rank)


class SlurmExecutor(SlurmPipelineExecutor):
    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        return _run_quietly(super()._run_for_rank, rank, local_rank, node_rank)


RAY_ERRORS = "errors"


class RayExecutor(RayPipelineExecutor):
    """datatrove's Ray executor only logs a task's exception; each failed task also leaves
    `errors/<rank>.json` (the exception's class and message) for the driver to raise."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        import datatrove.executor.ray as ray_executor

        try:
            return _run_quietly(super()._run_for_rank, rank, local_rank, node_rank, ray_executor)
        except Exception as err:
            kind = f"{type(err).__module__}.{type(err).__qualname__}"
            with self.logging_dir.open(f"{RAY_ERRORS}/{rank:05d}.json", "w") as f:
                json.dump({"type": kind, "message": str(err)}, f)
            raise
