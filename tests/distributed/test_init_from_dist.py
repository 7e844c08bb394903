"""`train.init_from` across layouts: a 2-rank ZeRO-1 checkpoint starts a 2-rank partitioned ZeRO-3 run."""

from __future__ import annotations

import pytest
import torch
from dist_jobs import check, deepspeed_job, losses

from llmtrain.config import load_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_zero1_checkpoint_starts_a_zero3_run_with_its_weights(runs):
    """The continued run's first loss (before its first update, averaged over both ranks) is the
    source model's loss on the two ranks' slices of that run's first global batch."""
    from llmtrain.data.batch import batch_to_device
    from llmtrain.data.loader import build_train_loader
    from llmtrain.inference import load_checkpoint_model

    source = runs.reference(1)  # 2 ranks, ZeRO-1, checkpoints at steps 3 and 6
    run_dir = runs.root / "init_from_z1_to_z3"
    extra = ["deepspeed.zero_stage=3", f"train.init_from={source}", "train.max_steps=1", "train.val_every=0"]
    extra += ["checkpoint.at_end=false", "optim.lr=1e-3", "run.seed=7"]
    overrides = runs.overrides(run_dir, *extra)
    result = check(deepspeed_job(overrides, cwd=runs.root))
    assert f"initialized the weights from {source / 'checkpoints' / 'step_6'}" in result.stderr

    cfg = load_config(overrides)
    model = load_checkpoint_model(load_config(runs.overrides(source)), None, device=torch.device("cpu")).model
    per_rank = []
    for rank in range(2):
        batch = build_train_loader(cfg, rank, 2).next_batch()
        inputs, targets, doc_ids = batch_to_device(batch, torch.device("cpu"), cfg.model.doc_mask)
        with torch.no_grad():
            per_rank.append(float(model(inputs, targets, doc_ids)))
    assert losses(run_dir)[1] == pytest.approx(sum(per_rank) / 2, rel=1e-5)
