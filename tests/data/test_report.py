"""The data report of `llmtrain prepare`, also with cleaning off: tokens per source, the mixture's
sampled shares against the corpus shares, and the epochs the weights imply over the run."""

from __future__ import annotations

import json

import pytest

from llmtrain.config import load_config
from llmtrain.data.prepare import prepare
from llmtrain.data.report import build_report, table


def test_report_is_written_with_cleaning_off(prepared_data):
    report = json.loads((prepared_data.data_dir / "report.json").read_text())
    assert set(report) == {"sources", "mixture", "run"}
    for name in prepared_data.sources:
        row = report["sources"][name]
        done = json.loads((prepared_data.data_dir / "shards" / name / "done.json").read_text())
        tokens = sum(done["splits"][s]["tokens"] for s in ("train", "val"))
        docs = sum(done["splits"][s]["docs"] for s in ("train", "val"))
        assert row["tokens_out"] == tokens and row["docs_out"] == docs == row["docs_in"]
        assert row["removed"] == {} and row["cleaned"] is False
    assert report["mixture"]["books"]["share"] == 0.25 and report["mixture"]["web"]["share"] == 0.75
    shares = [m["corpus_share"] for m in report["mixture"].values()]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    assert report["run"]["global_batch_size"] is None and report["mixture"]["web"]["epochs"] is None
    assert (prepared_data.data_dir / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_epochs_follow_the_weights_and_the_run_length(prepared_data, monkeypatch):
    import llmtrain.data.prepare as prep

    run = ["train.max_steps=500", "train.global_batch_size=16", "train.seq_len=64"]
    cfg = load_config(prepared_data.overrides + run)
    results = []  # the per-source results of the prepared folder (a rerun reads them from done.json)
    monkeypatch.setattr(prep, "write_report", lambda c, res: results.extend(res))
    prepare(cfg)
    report = build_report(cfg, results)
    for name, weight_share in (("books", 0.25), ("web", 0.75)):
        windows = (report["sources"][name]["train_tokens"] - 1) // 64
        assert report["mixture"][name]["epochs"] == pytest.approx(weight_share * 500 * 16 / windows, rel=1e-3)
        assert report["mixture"][name]["sampled_tokens"] == round(weight_share * 500 * 16 * 64)
    text = table(report)
    assert text.splitlines()[0].split()[:3] == ["source", "docs", "in"]
    assert "books" in text and "75.0%" in text
