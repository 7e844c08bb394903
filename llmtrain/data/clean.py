"""The clean stage of `llmtrain prepare`: filters, decontamination and deduplication on datatrove.

A source whose `clean` settings do something (docs/cleaning.md) goes through a datatrove pipeline
before it is tokenized; with cleaning off (the default) this module imports nothing and costs nothing.

Determinism: the source's files are cut into `clean.tasks` contiguous blocks, fixed by the settings
and the corpus, never by the worker count; task r writes `kept/<r>.jsonl`, and the tokenizer reads
those files in rank order, so the shards are the same whatever `prepare.workers` or executor.
Resumption: each datatrove stage marks its finished tasks (`stages/<n>/completions/`), a rerun skips
them; `done.json` closes the source. Changed settings (`settings.json`) start its cleaning over.

    <data.dir>/clean/<source>/settings.json   what the output depends on
                              decont_index/    n-gram hashes of each task file
                              stages/<n>_<name>/   datatrove's logs, stats and completion markers
                              work/            intermediate documents and signatures (deleted at the end)
                              kept/<r>.jsonl   the documents that survive, in corpus order
                              done.json        counts per stage, read by the report
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from llmtrain.data.clean_state import (
    DONE_FILE,
    SETTINGS_FILE,
    SUBMITTED_FILE,
    CleanPending,
    CleanResult,
    clean_dir,
    load_result,
    read_json,
    read_shard,
)
from llmtrain.data.config import CleanConfig, SourceConfig, source_clean
from llmtrain.data.corpus import Document, ReadStats, iter_documents, list_files
from llmtrain.errors import DataError, UserError
from llmtrain.io import write_atomic


def source_index(cfg, name: str) -> int:
    return next(i for i, s in enumerate(cfg.data.sources) if s.name == name)


def clean_settings(clean: CleanConfig) -> dict | None:
    """The clean settings as they enter a source's settings hash; None when the stage is off."""
    return dataclasses.asdict(clean) if clean.active else None


def _settings(cfg, src: SourceConfig, clean: CleanConfig) -> dict:
    return {
        "clean": clean_settings(clean),
        "path": src.path if src.format != "stdlib" else "stdlib",
        "format": src.format,
        "text_field": src.text_field,
        "separator": src.separator,
        "on_bad_record": cfg.data.on_bad_record,
    }


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def source_documents(cfg, src: SourceConfig, stats: ReadStats | None = None) -> Iterator[Document]:
    """The documents of a source that tokenization reads: its clean output in task order when the
    stage is on (it must have finished), else the corpus itself."""
    index = source_index(cfg, src.name)
    if not source_clean(cfg.data, index).active:
        yield from iter_documents(src, on_bad_record=cfg.data.on_bad_record, stats=stats)
        return
    folder = clean_dir(cfg.data_dir, src.name)
    result = load_result(cfg.data_dir, src.name)
    if result is None:
        raise DataError(f"data source {src.name!r}: its clean stage has not finished ({folder / DONE_FILE})")
    if stats is not None:
        stats.skipped = result.skipped_records
    for rank in range(result.tasks):
        for doc_id, text in read_shard(folder / "kept" / f"{rank:05d}.jsonl"):
            yield Document(doc_id, text)


def clean_source(cfg, index: int, workers: int) -> CleanResult | None:
    """Run (or resume, or reuse) the clean stage of `cfg.data.sources[index]`; None when it is off.

    Raises CleanPending after handing the work to SLURM (or while those jobs run).
    """
    src = cfg.data.sources[index]
    clean = source_clean(cfg.data, index)
    if not clean.active:
        return None
    # absolute paths: SLURM and Ray tasks may run in another working directory
    folder = clean_dir(cfg.data_dir, src.name).absolute()
    settings = _settings(cfg, src, clean)
    done = read_json(folder / DONE_FILE)
    if (
        done is not None
        and done.get("settings") == settings
        and (cached := load_result(cfg.data_dir, src.name))
    ):
        cached.status = "cached"
        return cached
    started = read_json(folder / SETTINGS_FILE)
    if folder.exists() and (started is None or started.get("settings") != settings):
        shutil.rmtree(folder)  # other settings (or another corpus): nothing of it can be reused
    resumed = folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / SETTINGS_FILE, {"settings": settings})
    _require_datatrove()
    from llmtrain.data import clean_pipeline

    t0 = time.perf_counter()
    root, files = list_files(src)
    root, files = root.absolute(), [p.absolute() for p in files]
    tasks = min(clean.tasks, len(files))
    blocks = [
        [str(p) for p in files[r * len(files) // tasks : (r + 1) * len(files) // tasks]] for r in range(tasks)
    ]
    if clean.decontaminate:
        from llmtrain.data.decontaminate import build_index

        key = f"data.sources[{index}].clean.decontaminate" if src.clean else "data.clean.decontaminate"
        build_index(clean.decontaminate, clean.decont, folder / "decont_index", key)
    stages = clean_pipeline.build_stages(src, clean, root, blocks, cfg.data.on_bad_record, folder)
    clean_pipeline.run_stages(cfg, src.name, stages, workers, folder)
    result = clean_pipeline.collect(src.name, stages, tasks)
    result.seconds = round(time.perf_counter() - t0, 3)
    result.status = "resumed" if resumed else "done"
    _write_json(folder / DONE_FILE, {"settings": settings, "result": dataclasses.asdict(result)})
    shutil.rmtree(folder / "work", ignore_errors=True)
    (folder / SUBMITTED_FILE).unlink(missing_ok=True)
    return result


def _require_datatrove() -> None:
    try:
        import datatrove  # noqa: F401
    except ImportError:
        raise UserError(
            "data.clean: the clean stage needs datatrove; install it with `pip install -e .[clean]` "
            "(or turn cleaning off: data.clean.enabled=false)"
        ) from None


def source_clean_settings(cfg, src: SourceConfig) -> dict | None:
    """The clean settings of a source as they enter its shard settings (None: cleaning off)."""
    return clean_settings(source_clean(cfg.data, source_index(cfg, src.name)))


def clean_sources(cfg, sources: list[SourceConfig], workers: int) -> bool:
    """Run the clean stage of each source that has one; False while SLURM jobs still have to run."""
    waiting = []
    for src in sources:
        try:
            res = clean_source(cfg, source_index(cfg, src.name), workers)
        except CleanPending as pending:
            waiting.append(str(pending))
            continue
        if res is not None and res.status != "cached":
            removed = ", ".join(f"{k} {v:,}" for k, v in res.removed.items() if v) or "nothing"
            print(
                f"clean {src.name}: {res.docs_in:,} docs in, {res.docs_out:,} kept; removed {removed} "
                f"({res.seconds:.1f} s, {res.tasks} task{'s' if res.tasks != 1 else ''})",
                flush=True,
            )
    for line in waiting:
        print(line, flush=True)
    return not waiting
