"""`llmtrain prepare`: shards hold exactly the corpus, are byte-identical for any worker count,
resume after an interruption, skip finished work, and bad input gives one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import corpus_overrides, write_corpus

from llmtrain import cli
from llmtrain.config import load_config
from llmtrain.data.corpus import iter_documents, split_of
from llmtrain.data.prepare import prepare, tokenizer_sample
from llmtrain.data.shards import ShardReader, list_shards
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.errors import DataError


def snapshot(data_dir: Path) -> dict[str, bytes]:
    """Every file of a prepared folder (relative path -> bytes), temp files included."""
    return {
        p.relative_to(data_dir).as_posix(): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()
    }


def small_corpus(tmp_path: Path, **overrides) -> tuple[list[str], Path]:
    books, web = write_corpus(tmp_path / "corpus", books=12, records=80)
    data_dir = tmp_path / "data"
    extra = [f"{k}={v}" for k, v in overrides.items()]
    return corpus_overrides(data_dir, books, web) + ["prepare.shard_tokens=3000"] + extra, data_dir


def test_shards_decode_to_exactly_the_corpus_documents(prepared_data):
    cfg = load_config(prepared_data.overrides)
    tok = load_tokenizer(prepared_data.data_dir)
    for src in cfg.data.sources:
        expected = {"train": [], "val": []}
        for doc in iter_documents(src):
            expected[split_of(doc.id, cfg.data.val_fraction)].append(doc.text)
        done = json.loads((prepared_data.data_dir / "shards" / src.name / "done.json").read_text())
        for split, texts in expected.items():
            got, tokens = [], 0
            for prefix in list_shards(prepared_data.data_dir, src.name, split):
                reader = ShardReader(prefix, vocab_size=tok.vocab_size, tokenizer_hash=tok.hash)
                reader.verify()
                offs = reader.doc_offsets
                for a, b in zip(offs[:-1], offs[1:]):
                    doc = np.asarray(reader.tokens[a:b])
                    assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
                    got.append(tok.decode(doc[:-1]))
                tokens += reader.num_tokens
            assert got == texts, f"{src.name}/{split}"
            assert len(texts) > 0
            assert done["splits"][split]["docs"] == len(texts) and done["splits"][split]["tokens"] == tokens


def test_shards_close_at_the_first_document_end_past_shard_tokens(prepared_data):
    cfg = load_config(prepared_data.overrides)
    prefixes = list_shards(prepared_data.data_dir, "web", "train")
    assert len(prefixes) >= 3
    for prefix in prefixes[:-1]:
        reader = ShardReader(prefix)
        last_doc = int(reader.doc_offsets[-1] - reader.doc_offsets[-2])
        assert cfg.prepare.shard_tokens <= reader.num_tokens < cfg.prepare.shard_tokens + last_doc


def test_byte_identical_with_one_or_two_workers(tmp_path):
    overrides, _ = small_corpus(tmp_path)
    one = load_config(overrides + [f"data.dir={tmp_path / 'one'}", "prepare.workers=1"])
    two = load_config(overrides + [f"data.dir={tmp_path / 'two'}", "prepare.workers=2"])
    prepare(one)
    prepare(two)
    a, b = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert sum(name.endswith(".idx") for name in a) >= 6
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_rerun_skips_everything_and_changes_nothing(prepared_data, capsys):
    before = {p: p.stat().st_mtime_ns for p in prepared_data.data_dir.rglob("*")}
    prepare(load_config(prepared_data.overrides))
    assert "already prepared" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in prepared_data.data_dir.rglob("*")} == before


def test_interrupted_run_resumes_after_complete_shards_with_identical_result(tmp_path):
    overrides, data_dir = small_corpus(tmp_path)
    prepare(load_config(overrides))
    full = snapshot(data_dir)
    shards = list_shards(data_dir, "web", "train")
    assert len(shards) >= 3
    # as if killed while writing the third shard: no done.json, a temp .bin, shard 2 onwards missing
    (data_dir / "shards" / "web" / "done.json").unlink()
    for prefix in shards[2:]:
        prefix.with_name(prefix.name + ".idx").unlink()
    shards[2].with_name(shards[2].name + ".bin").rename(shards[2].with_name(shards[2].name + ".bin.tmp"))
    kept = shards[0].with_name(shards[0].name + ".bin").stat().st_mtime_ns
    prepare(load_config(overrides))
    assert snapshot(data_dir) == full
    assert shards[0].with_name(shards[0].name + ".bin").stat().st_mtime_ns == kept  # not rewritten


def decoded_documents(data_dir: Path, source: str, split: str) -> list[str]:
    tok = load_tokenizer(data_dir)
    texts = []
    for prefix in list_shards(data_dir, source, split):
        reader = ShardReader(prefix, tokenizer_hash=tok.hash)
        offs = reader.doc_offsets
        texts += [tok.decode(np.asarray(reader.tokens[a : b - 1])) for a, b in zip(offs[:-1], offs[1:])]
    return texts


def test_interrupted_run_with_another_corpus_path_starts_the_source_over(tmp_path):
    overrides, data_dir = small_corpus(tmp_path)
    prepare(load_config(overrides))
    old_shards = len(list_shards(data_dir, "web", "train"))
    (data_dir / "shards" / "web" / "done.json").unlink()  # as if killed before the source finished
    # the user then points `web` at another file: more records than the old shards hold (the old
    # shards would pass every check and silently replace its first documents), then fewer
    books = tmp_path / "corpus" / "books"
    for records, seed in ((160, 7), (30, 8)):
        _, other_web = write_corpus(tmp_path / f"other{seed}", books=1, records=records, seed=seed)
        other = corpus_overrides(data_dir, books, other_web) + ["prepare.shard_tokens=3000"]
        prepare(load_config(other))
        (data_dir / "shards" / "web" / "done.json").unlink()
        src = load_config(other).data.sources[1]
        expected = [d.text for d in iter_documents(src) if split_of(d.id, 0.1) == "train"]
        assert decoded_documents(data_dir, "web", "train") == expected
    assert len(list_shards(data_dir, "web", "train")) < old_shards  # the old ones past the new end are gone


def test_new_tokenizer_under_old_shards_is_refused(tmp_path):
    overrides, data_dir = small_corpus(tmp_path)
    prepare(load_config(overrides))
    old_hash = load_tokenizer(data_dir).hash
    (data_dir / "tokenizer.model").unlink()
    (data_dir / "tokenizer.json").unlink()
    with pytest.raises(
        DataError, match=r"books/done\.json: shards of source 'books' were made with tokenizer_hash="
    ) as err:
        prepare(load_config(overrides + ["tokenizer.vocab_size=400"]))
    assert "delete" in str(err.value)
    new_hash = load_tokenizer(data_dir).hash
    assert new_hash != old_hash
    prefix = list_shards(data_dir, "books", "train")[0]
    with pytest.raises(DataError, match=r"train_00000\.idx: shard was written by tokenizer"):
        ShardReader(prefix, tokenizer_hash=new_hash)


def test_bad_path_fails_before_any_work(tmp_path):
    overrides, data_dir = small_corpus(tmp_path)
    bad = overrides + [f"data.sources=[{{name:gone,path:'{tmp_path / 'nope'}',format:txt}}]"]
    with pytest.raises(DataError, match=r"data source 'gone': path .*nope does not exist"):
        prepare(load_config(bad))
    assert not (data_dir / "tokenizer.model").exists()


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("   \n")
    overrides, _ = small_corpus(tmp_path)
    src = f"data.sources=[{{name:books,path:'{tmp_path / 'corpus' / 'books'}'}},{{name:blank,path:'{tmp_path / 'blank'}'}}]"
    with pytest.raises(DataError, match=r"data source 'blank': no documents in .*blank"):
        prepare(load_config(overrides + [src]))


def test_malformed_record_fails_or_is_skipped_and_counted(tmp_path, capsys):
    overrides, data_dir = small_corpus(tmp_path)
    web = tmp_path / "corpus" / "web.jsonl"
    lines = web.read_text().splitlines()
    lines[4] = '{"text": "broken'
    web.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"web\.jsonl:5: malformed JSON"):
        prepare(load_config(overrides))
    shutil.rmtree(data_dir)
    prepare(load_config(overrides + ["data.on_bad_record=skip"]))
    out = capsys.readouterr().out
    assert "1 bad records skipped" in out
    done = json.loads((data_dir / "shards" / "web" / "done.json").read_text())
    assert done["skipped_records"] == 1 and done["bad_examples"] == [f"{web}:5"]
    assert sum(done["splits"][s]["docs"] for s in ("train", "val")) == 79


def test_tokenizer_sample_respects_budget_weights_and_is_repeatable(tmp_path):
    overrides, _ = small_corpus(tmp_path)
    cfg = load_config(overrides + ["tokenizer.char_budget=40000"])
    sample = tokenizer_sample(cfg)
    assert sample == tokenizer_sample(cfg)
    assert 30000 < sum(map(len, sample)) <= 40000
    books = {p.read_text() for p in (tmp_path / "corpus" / "books").iterdir()}
    in_books = sum(len(t) for t in sample if t in books)
    assert 8000 < in_books <= 10000  # weight 1 of 4: a quarter of the budget
    val = {d.text for s in cfg.data.sources for d in iter_documents(s) if split_of(d.id, 0.1) == "val"}
    assert not val & set(sample)


def test_cli_error_is_one_line_without_traceback(tmp_path, capsys):
    code = cli.main(
        [
            "prepare",
            f"data.dir={tmp_path / 'd'}",
            f"data.sources=[{{name:x,path:'{tmp_path / 'missing'}',format:jsonl}}]",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("llmtrain prepare: error: data source 'x': path ") and err.endswith(
        "missing does not exist"
    )
    assert "\n" not in err and "Traceback" not in err


def test_user_data_config_through_config_dir_and_cli(tmp_path, capsys):
    books, web = write_corpus(tmp_path / "corpus", books=6, records=40)
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "mycorpus.yaml").write_text(
        "sources:\n"
        f"  - {{name: books, path: {books}/*.txt, format: txt, weight: 1.0}}\n"
        f"  - {{name: web, path: {web}, format: jsonl, text_field: text, weight: 3.0}}\n"
    )
    argv = [
        "prepare",
        "--config-dir",
        str(tmp_path / "conf"),
        "data=mycorpus",
        f"data.dir={tmp_path / 'out'}",
    ]
    argv += ["tokenizer.vocab_size=400", "prepare.progress=false", "data.val_fraction=0.1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "tokenizer: trained" in out and "46 docs" in out and "0 bad records skipped" in out
    assert len(list_shards(tmp_path / "out", "books", "train")) == 1
    assert cli.main(argv) == 0
    assert "already prepared" in capsys.readouterr().out
