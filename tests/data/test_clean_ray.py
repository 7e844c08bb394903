"""`prepare.executor=ray` on one machine (a private local Ray runtime): the same kept documents,
shards and counts as the local executor, a rerun reuses everything without starting Ray, and a
failed Ray task is raised as the local executor raises it and resumes from the finished tasks.

Slow (a Ray runtime and one Ray worker process per task) and needs `pip install -e .[ray]`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from clean_corpus import planted_overrides, write_planted

from llmtrain.config import load_config
from llmtrain.data.prepare import prepare
from llmtrain.errors import DataError

pytest.importorskip("datatrove")
ray = pytest.importorskip("ray")

# about 6 minutes on 2 busy cores: most of it is a Ray worker process started per task
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _files(folder: Path) -> dict[str, bytes]:
    """The shard files (.bin, .idx) or kept documents (.jsonl) of a folder; done.json names paths."""
    return {
        p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".idx", ".jsonl")
    }


def _removed(data_dir: Path) -> dict:
    report = json.loads((data_dir / "report.json").read_text())
    keys = ("docs_in", "docs_out", "chars_out", "removed", "removed_reasons", "tokens_out")
    return {name: {k: row[k] for k in keys} for name, row in report["sources"].items()}


def _ray_temp_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("llmtrain-ray-*")}


def test_ray_gives_the_local_shards_and_counts_and_a_rerun_reuses_everything(tmp_path, capsys):
    planted = write_planted(tmp_path / "corpus")
    temps = _ray_temp_dirs()
    on_ray = planted_overrides(planted, tmp_path / "ray", workers=2) + ["prepare.executor=ray"]
    prepare(load_config(on_ray))
    assert not ray.is_initialized()  # the local runtime was shut down ...
    assert _ray_temp_dirs() == temps  # ... and its files removed
    prepare(load_config(planted_overrides(planted, tmp_path / "local", workers=2)))
    for source in ("web", "books"):
        for folder in (f"shards/{source}", f"clean/{source}/kept"):
            assert _files(tmp_path / "ray" / folder), folder
            assert _files(tmp_path / "ray" / folder) == _files(tmp_path / "local" / folder), folder
    assert _removed(tmp_path / "ray") == _removed(tmp_path / "local")
    for source in ("web", "books"):
        row = _removed(tmp_path / "ray")[source]
        assert {k: v for k, v in row["removed"].items() if v} == planted.removed[source], source
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*")}
    prepare(load_config(on_ray))
    assert "already prepared" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*")} == before
    assert not ray.is_initialized()  # nothing to run: Ray was not started


def test_a_failed_ray_task_is_raised_and_the_rerun_resumes_from_the_finished_tasks(tmp_path):
    planted = write_planted(tmp_path / "corpus")
    books = tmp_path / "books"
    shutil.copytree(planted.books, books)
    last = sorted(books.iterdir())[-1]
    good = last.read_bytes()
    last.write_bytes(b"\xff" + good)  # the last task of the filter stage fails on it
    source = f"data.sources=[{{name:books,path:'{books}',format:txt,clean:{{tasks:3}}}}]"
    common = planted_overrides(planted, tmp_path / "unused", workers=2) + [
        source,
        "data.clean.dedup=exact",
        "tokenizer.vocab_size=300",
    ]
    on_ray = common + [f"data.dir={tmp_path / 'ray'}", "prepare.executor=ray"]
    with pytest.raises(DataError, match=r"book_08\.txt:1: not valid UTF-8"):
        prepare(load_config(on_ray))
    assert not ray.is_initialized()
    stage = tmp_path / "ray" / "clean" / "books" / "stages" / "0_filter" / "completions"
    assert sorted(p.name for p in stage.iterdir()) == ["00000", "00001"]
    first = (stage / "00000").stat().st_mtime_ns
    last.write_bytes(good)
    prepare(load_config(on_ray))
    assert (stage / "00000").stat().st_mtime_ns == first  # finished tasks were not run again
    done = json.loads((tmp_path / "ray" / "clean" / "books" / "done.json").read_text())
    assert done["result"]["status"] == "resumed"
    prepare(load_config(common + [f"data.dir={tmp_path / 'local'}"]))
    assert _files(tmp_path / "ray" / "shards" / "books") == _files(tmp_path / "local" / "shards" / "books")
    assert _removed(tmp_path / "ray") == _removed(tmp_path / "local")
