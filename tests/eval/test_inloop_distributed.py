"""In-loop downstream evaluation on 2 real CPU ranks under ZeRO-3: each rank scores its share through
the engine's forward (parameters gathered on every forward, so the ranks' forwards must match), and
rank 0 logs the same scores that `llmtrain eval` gives on the checkpoint of that step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))

from dist_jobs import BASE, check, deepspeed_job  # noqa: E402

from llmtrain.cli import run as cli_run  # noqa: E402
from llmtrain.train.metrics import read_metrics  # noqa: E402


@pytest.mark.slow
def test_two_rank_zero3_in_loop_eval_matches_offline_eval(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        *prepared_data.overrides,
        *BASE,
        f"run.dir={run_dir}",
        "deepspeed.zero_stage=3",
        "train.max_steps=2",
        "checkpoint.every_steps=2",
        "train.val_every=0",
        "train.eval_tasks=[llmtrain_mc,llmtrain_qa]",
        "train.eval_every=2",
        "eval.limit=5",  # 3 + 2 documents: rank 1's share is padded
        "eval.registry=false",
    ]
    check(deepspeed_job(overrides, cwd=tmp_path, timeout=600))
    (record,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/llmtrain_mc/acc" in r]
    assert record["step"] == 2 and record["eval_s"] > 0

    assert (
        cli_run("eval", [*overrides, "eval.tasks=[llmtrain_mc,llmtrain_qa]", "eval.bootstrap_iters=0"]) == 0
    )
    offline = json.loads((run_dir / "eval" / "2" / "results.json").read_text())["results"]
    for task, metric in [("llmtrain_mc", "acc"), ("llmtrain_mc", "acc_norm"), ("llmtrain_qa", "f1")]:
        assert record[f"eval/{task}/{metric}"] == pytest.approx(offline[task][f"{metric},none"], abs=1e-9)
