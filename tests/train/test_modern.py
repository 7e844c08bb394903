"""experiment=modern trains end to end in one process (Muon, QK-norm, ReLU², soft-cap, WSD)."""

from __future__ import annotations

from trainer_runs import TINY_RUN, train

from llmtrain.config import load_config
from llmtrain.train.metrics import read_metrics


def test_the_modern_preset_trains_and_its_loss_falls(prepared_data, tmp_path, restore_env):
    import torch._dynamo

    run_dir = tmp_path / "modern"
    overrides = [*prepared_data.overrides, *TINY_RUN, "experiment=modern", "train.max_steps=8"]
    overrides += ["schedule.warmup_steps=1", "checkpoint.every_steps=0", f"run.dir={run_dir}"]
    cfg = load_config(overrides)
    assert (cfg.optim.name, cfg.model.qk_norm, cfg.model.activation, cfg.train.grad_clip) == (
        "muon",
        True,
        "relu2",
        0,
    )
    with torch._dynamo.config.patch(disable=True):  # DeepSpeed's Newton-Schulz step eager: 25 s less
        assert train(overrides) == 0
    loss = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    assert loss[8] < loss[1] - 0.3, loss
