"""The clean stage of `llmtrain prepare`: each planted problem is removed by the stage meant for it and
counted, everything else is kept byte for byte; the same shards for any worker count; an interrupted
clean resumes; a changed threshold re-prepares its source; bad settings are one line naming the key;
SLURM job scripts and the Ray path; nothing of it is imported or paid for with cleaning off."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clean_corpus import planted_overrides, write_planted

from llmtrain.config import load_config
from llmtrain.data.corpus import split_of
from llmtrain.data.prepare import prepare
from llmtrain.data.shards import ShardReader, list_shards
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.errors import ConfigError, DataError, UserError

pytest.importorskip("datatrove")


def decoded(data_dir: Path, source: str, split: str) -> list[str]:
    tok = load_tokenizer(data_dir)
    texts = []
    for prefix in list_shards(data_dir, source, split):
        reader = ShardReader(prefix, tokenizer_hash=tok.hash)
        offs = reader.doc_offsets
        texts += [tok.decode(np.asarray(reader.tokens[a : b - 1])) for a, b in zip(offs[:-1], offs[1:])]
    return texts


def shard_files(data_dir: Path, source: str) -> dict[str, bytes]:
    folder = data_dir / "shards" / source
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith((".bin", ".idx"))}


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """The planted corpus, prepared once with every stage on and one worker (read only)."""
    root = tmp_path_factory.mktemp("clean")
    planted = write_planted(root / "corpus")
    overrides = planted_overrides(planted, root / "data")
    prepare(load_config(overrides))
    return planted, overrides, root / "data"


def test_each_planted_problem_is_removed_by_its_stage_and_the_rest_kept_byte_for_byte(cleaned):
    planted, overrides, data_dir = cleaned
    report = json.loads((data_dir / "report.json").read_text())
    for source in ("web", "books"):
        row = report["sources"][source]
        assert {k: v for k, v in row["removed"].items() if v} == planted.removed[source], source
        assert row["docs_in"] == planted.docs_in[source]
        assert row["docs_out"] == len(planted.kept[source])
        assert row["chars_out"] == sum(len(t) for t in planted.kept[source])
        # the shards hold exactly the kept documents (train and validation split by id, as always)
        ids = [d for d in _kept_ids(data_dir, source)]
        for split in ("train", "val"):
            expected = [t for t, i in zip(planted.kept[source], ids) if split_of(i, 0.1) == split]
            assert decoded(data_dir, source, split) == expected, (source, split)
        tokens = sum(
            ShardReader(p).num_tokens for s in ("train", "val") for p in list_shards(data_dir, source, s)
        )
        assert row["tokens_out"] == tokens
    assert report["sources"]["web"]["removed_reasons"]["gopher_quality"] == {"gopher_short_doc": 1}
    assert report["mixture"]["books"]["share"] == 0.75
    assert report["mixture"]["web"]["epochs"] == pytest.approx(
        0.25 * 100 * 8 / ((report["sources"]["web"]["train_tokens"] - 1) // 128), rel=1e-3
    )
    assert (data_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (data_dir / "clean" / "web" / "work").exists()  # intermediates are gone


def _kept_ids(data_dir: Path, source: str) -> list[str]:
    from llmtrain.data.clean import load_result, read_shard

    tasks = load_result(data_dir, source).tasks
    folder = data_dir / "clean" / source / "kept"
    return [i for r in range(tasks) for i, _ in read_shard(folder / f"{r:05d}.jsonl")]


def test_rerun_reuses_everything_and_changes_nothing(cleaned, capsys):
    _, overrides, data_dir = cleaned
    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")}
    prepare(load_config(overrides))
    assert "already prepared" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")} == before


def test_shards_are_byte_identical_with_two_workers(cleaned, tmp_path):
    planted, overrides, data_dir = cleaned
    # books alone (3 tasks, dedup across them), with the same tokenizer
    books = f"data.sources=[{{name:books,path:'{planted.books}',format:txt,weight:3.0,clean:{{tasks:3}}}}]"
    other = overrides + [books, f"data.dir={tmp_path / 'two'}", "prepare.workers=2"]
    prepare(load_config(other + [f"tokenizer.path={data_dir / 'tokenizer.model'}"]))
    assert shard_files(tmp_path / "two", "books") == shard_files(data_dir, "books")
    kept = data_dir / "clean" / "books" / "kept"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "two" / "clean" / "books" / "kept").iterdir()
    }


def test_interrupted_clean_resumes_and_gives_the_same_shards(cleaned, tmp_path):
    planted, overrides, data_dir = cleaned
    books = tmp_path / "books"
    shutil.copytree(planted.books, books)
    last = sorted(books.iterdir())[-1]
    good = last.read_bytes()
    last.write_bytes(b"\xff" + good)  # the last task of the filter stage fails on it
    only_books = f"data.sources=[{{name:books,path:'{books}',format:txt,weight:3.0,clean:{{tasks:3}}}}]"
    other = overrides + [
        only_books,
        f"data.dir={tmp_path / 'data'}",
        f"tokenizer.path={data_dir / 'tokenizer.model'}",
    ]
    with pytest.raises(DataError, match=r"book_08\.txt:1: not valid UTF-8"):
        prepare(load_config(other))
    stage = tmp_path / "data" / "clean" / "books" / "stages" / "0_filter" / "completions"
    assert sorted(p.name for p in stage.iterdir()) == ["00000", "00001"]
    first = (stage / "00000").stat().st_mtime_ns
    last.write_bytes(good)
    prepare(load_config(other))
    assert (stage / "00000").stat().st_mtime_ns == first  # finished tasks were not run again
    done = json.loads((tmp_path / "data" / "clean" / "books" / "done.json").read_text())
    assert done["result"]["status"] == "resumed"
    assert shard_files(tmp_path / "data", "books") == shard_files(data_dir, "books")


def test_a_changed_threshold_reprepares_that_source_only(cleaned, tmp_path):
    planted, overrides, data_dir = cleaned
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    books_before = {p: p.stat().st_mtime_ns for p in (copy / "shards" / "books").iterdir()}
    changed = planted_overrides(planted, copy, web_clean="min_chars:900")
    prepare(load_config(changed))
    report = json.loads((copy / "report.json").read_text())
    assert report["sources"]["web"]["removed"]["length"] > planted.removed["web"]["length"]
    assert {p: p.stat().st_mtime_ns for p in (copy / "shards" / "books").iterdir()} == books_before
    kept = [t for t in planted.kept["web"] if len(t) >= 900]
    assert sorted(decoded(copy, "web", "train") + decoded(copy, "web", "val")) == sorted(kept)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.clean.filters=[gopher_quality,gopher_qualty]",
            "data.clean.filters: unknown filter 'gopher_qualty'",
        ),
        (
            "data.clean.gopher_repetition.dup_line_frac=1.5",
            "data.clean.gopher_repetition.dup_line_frac: is a share",
        ),
        ("data.clean.c4.min_words_per_line=-3", "data.clean.c4.min_words_per_line: must be >= -1"),
        ("data.clean.dedup=fuzzy", "data.clean.dedup: must be none, exact, near or both"),
        ("data.clean.near.threshold=1.0", "data.clean.near.threshold: must be in (0, 1)"),
        ("data.clean.max_chars=0", "data.clean.max_chars: must be above min_chars"),
        (
            "data.clean.language.languages=[en]",
            "data.clean.language.model: language identification needs a local",
        ),
        ("data.sources=[{name:a,path:x,clean:{gopher:{}}}]", "data.sources[0].clean.gopher: no such key"),
        (
            "data.sources=[{name:a,path:x,clean:{fineweb:{short_line_thr:2}}}]",
            "data.sources[0].clean.fineweb.short_line_thr: is a share",
        ),
        ("prepare.executor=spark", "prepare.executor: must be local, slurm or ray"),
        ("prepare.executor=slurm", "prepare.slurm.partition: required with prepare.executor=slurm"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_cleaning_off_imports_nothing_and_the_stdlib_default_keeps_it_off():
    code = (
        "import sys\n"
        "from llmtrain.config import load_config\n"
        "from llmtrain.data import clean, prepare\n"
        "cfg = load_config(['data=stdlib'])\n"
        "assert not cfg.data.clean.active and clean.clean_source(cfg, 0, 1) is None\n"
        "print('datatrove' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_datatrove_the_stage_says_how_to_install_it(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['datatrove'] = None\n"
        "from llmtrain.config import load_config\n"
        "from llmtrain.data.clean import clean_source\n"
        f"cfg = load_config(['data.dir={tmp_path}', 'data.sources=[{{name:a,path:{tmp_path},format:txt}}]',"
        " 'data.clean.dedup=exact'])\n"
        "try:\n"
        "    clean_source(cfg, 0, 1)\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("UserError data.clean: the clean stage needs datatrove")
    assert "pip install -e .[clean]" in out.stdout


def test_decontamination_task_files_name_their_tasks_and_bad_lines(tmp_path):
    from llmtrain.data.config import DecontConfig
    from llmtrain.data.decontaminate import build_index, task_files

    planted = write_planted(tmp_path / "corpus")
    names = [name for name, _ in task_files([str(planted.tasks)], "data.clean.decontaminate")]
    assert names == ["tasks/cloze_mini", "tasks/qa_mini"]  # README.yaml is no task file
    counts = build_index([str(planted.tasks)], DecontConfig(), tmp_path / "index", "k")
    assert counts["tasks/qa_mini"] > 0 and (tmp_path / "index" / "tasks" / "qa_mini.index.hashes").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "fine"}\n{"q": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        build_index([str(bad)], DecontConfig(), tmp_path / "index2", "k")
    with pytest.raises(
        DataError, match=r"^data\.clean\.decontaminate: task file or folder .*missing does not exist"
    ):
        task_files([str(tmp_path / "missing")], "data.clean.decontaminate")


def test_language_identification_keeps_only_the_listed_language():
    from datatrove.data import Document

    from llmtrain.data.clean_steps import FastTextLanguageFilter

    # lid_toy.bin (40 kB): a fastText classifier (labels en / xx) trained once with
    # fasttext.train_supervised(dim=8, bucket=10, epoch=20) on 100 sentences of clean_corpus.sentence()
    # against 100 lines of random syllables; the filter takes any local fastText model this way.
    # (Trained offline, not here: this fasttext build stops training at random with "Encountered NaN".)
    model = Path(__file__).with_name("lid_toy.bin")
    keep = FastTextLanguageFilter(str(model), ["en"], 0.5)
    assert keep.filter(Document(text="The old man walked to the market before the rain.", id="a")) is True
    assert keep.filter(Document(text="zo baki mu ta rene\nvo kisa", id="b")) == (False, "not_en")
    strict = FastTextLanguageFilter(str(model), ["en"], 1.0)  # below the score: removed too
    assert strict.filter(Document(text="The old man walked to the market before the rain.", id="a")) == (
        False,
        "not_en",
    )


def test_a_missing_language_model_is_refused_naming_the_key(cleaned, tmp_path):
    planted, overrides, _ = cleaned
    web = f"data.sources=[{{name:web,path:'{planted.web}',format:jsonl}}]"
    lang = ["data.clean.language.languages=[en]", f"data.clean.language.model={tmp_path / 'lid.176.bin'}"]
    with pytest.raises(UserError, match=r"^data\.clean\.language\.model: .*lid\.176\.bin is not a file"):
        prepare(load_config(overrides + [web, f"data.dir={tmp_path / 'data'}"] + lang))


def test_c4_keeps_the_text_of_kept_documents_unless_remove_lines(tmp_path):
    from datatrove.data import Document

    from llmtrain.data.clean_steps import KeepTextC4Filter

    text = "A Title Without A Full Stop\n" + "\n".join(
        f"Line {i} of the story goes on here." for i in range(6)
    )
    for remove_lines, expected in ((False, text), (True, text.split("\n", 1)[1])):
        doc = Document(text=text, id="a")
        assert KeepTextC4Filter(remove_lines=remove_lines, language=_words()).filter(doc) is True
        assert doc.text == expected


def _words():
    from llmtrain.data.clean_steps import WORDS

    return WORDS


def test_lsh_bands_follow_the_threshold():
    from llmtrain.data.clean_pipeline import lsh_bands

    for threshold in (0.5, 0.7, 0.85):
        bands, rows = lsh_bands(threshold, 112)
        assert bands * rows <= 112
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.08, (threshold, bands, rows)


FAKE_SBATCH = """#!/bin/sh
n=$(ls "{out}" | grep -c job_ || true)
n=$((n + 1))
script=""
for a in "$@"; do script="$a"; done
{{ echo "ARGS: $*"; cat "$script"; }} > "{out}/job_$n.sh"
echo "Submitted batch job $((100 + n))"
"""


def test_slurm_submits_dependent_job_arrays_with_the_configured_resources(
    cleaned, tmp_path, capsys, monkeypatch
):
    planted, overrides, _ = cleaned
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(out=jobs))
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    web = f"data.sources=[{{name:web,path:'{planted.web}',format:jsonl}}]"
    slurm = [
        web,
        f"data.dir={tmp_path / 'data'}",
        "data.clean.dedup=exact",
        "prepare.executor=slurm",
        "prepare.slurm.partition=cpu",
        "prepare.slurm.time=00:30:00",
        "prepare.slurm.cpus_per_task=2",
        "+prepare.slurm.sbatch_args={account:proj}",
    ]
    cfg = load_config(overrides + slurm)
    prepare(cfg)
    out = capsys.readouterr().out
    assert "clean web: submitted SLURM jobs 101, 103, 105" in out
    assert not (tmp_path / "data" / "shards").exists()  # tokenizing waits for the jobs
    scripts = {p.name: p.read_text() for p in jobs.iterdir()}
    stages = [s for s in scripts.values() if "launch_pickled_pipeline" in s]
    assert len(stages) == 3  # filter, exact_find, exact_filter (the others merge datatrove's stats)
    for script, name in zip(stages, ("filter", "exact_find", "exact_filter")):
        for line in (
            "#SBATCH --partition=cpu",
            "#SBATCH --time=00:30:00",
            "#SBATCH --cpus-per-task=2",
            "#SBATCH --account=proj",
            f"#SBATCH --job-name=llmtrain-clean-web-{name}",
            "#SBATCH --array=0-0",
        ):
            assert line in script, (name, line)
    assert "--dependency=afterok:101" in stages[1] and "--dependency=afterok:103" in stages[2]
    prepare(cfg)  # the jobs have not run: nothing is submitted twice
    assert "have not finished (stage filter: 0/1 tasks done)" in capsys.readouterr().out
    assert len(list(jobs.iterdir())) == len(scripts)


def test_ray_without_ray_installed_says_how_to_install_it(cleaned, tmp_path):
    if _has("ray"):
        pytest.skip("ray is installed: this checks the message without it")
    planted, overrides, _ = cleaned
    web = f"data.sources=[{{name:web,path:'{planted.web}',format:jsonl}}]"
    cfg = load_config(overrides + [web, f"data.dir={tmp_path / 'data'}", "prepare.executor=ray"])
    with pytest.raises(UserError, match=r"^prepare\.executor=ray needs Ray: pip install"):
        prepare(cfg)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
def test_slurm_jobs_run_on_one_machine_give_the_local_shards(cleaned, tmp_path, monkeypatch):
    """Submit with the fake sbatch, run each job array's tasks here the way SLURM would
    (SLURM_ARRAY_TASK_ID, datatrove's launch_pickled_pipeline), then prepare again: it tokenizes the
    jobs' output into the same shards as a local run."""
    planted, overrides, _ = cleaned
    jobs, bin_dir = tmp_path / "jobs", tmp_path / "bin"
    jobs.mkdir()
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(out=jobs))
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho localhost\n")  # `scontrol show hostnames`
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    books = f"data.sources=[{{name:books,path:'{planted.books}',format:txt,clean:{{tasks:3}}}}]"
    common = overrides + [books, "data.clean.dedup=exact", "tokenizer.vocab_size=300"]
    slurm = common + [
        f"data.dir={tmp_path / 'slurm'}",
        "prepare.executor=slurm",
        "prepare.slurm.partition=cpu",
    ]
    prepare(load_config(slurm))
    launcher = Path(sys.executable).parent / "launch_pickled_pipeline"
    for script in sorted(jobs.iterdir(), key=lambda p: int(p.stem.split("_")[1])):
        text = script.read_text()
        if "launch_pickled_pipeline" not in text:
            continue  # datatrove's stats-merging jobs
        array = int(text.split("#SBATCH --array=0-")[1].split()[0].split("%")[0])
        pik = text.split("launch_pickled_pipeline ")[1].split()[0]
        for task in range(array + 1):
            env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_NODELIST": "localhost"}
            subprocess.run([str(launcher), pik], env=env, check=True, capture_output=True, timeout=300)
    prepare(load_config(slurm))
    prepare(load_config(common + [f"data.dir={tmp_path / 'local'}"]))
    assert shard_files(tmp_path / "slurm", "books") == shard_files(tmp_path / "local", "books")
    report = json.loads((tmp_path / "slurm" / "report.json").read_text())
    assert {k: v for k, v in report["sources"]["books"]["removed"].items() if v} == {"exact_dedup": 1}
