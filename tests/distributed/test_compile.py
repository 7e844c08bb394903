"""`model.compile=true` through DeepSpeed's `engine.compile()` on CPU ranks (Inductor), every ZeRO stage.

Slow (Inductor compiles forward and backward on every rank: minutes on 2 cores): `make test-slow`.
Compiled and eager runs of the same 6 steps agree to fp32 tolerance (Inductor fuses and reorders
floating-point work, so not bit for bit), and the checkpoints keep the eager parameter names.
"""

from __future__ import annotations

import math

import pytest
from dist_jobs import N, check, deepspeed_job, losses

from llmtrain.train import checkpoint as ckpt


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_compiled_training_matches_eager(runs, stage):
    eager = runs.reference(stage)
    run_dir = runs.root / f"compiled_z{stage}"
    ov = runs.overrides(run_dir, f"deepspeed.zero_stage={stage}", "model.compile=true")
    check(deepspeed_job(ov, cwd=runs.root, timeout=1200))
    got, want = losses(run_dir), losses(eager)
    assert sorted(got) == list(range(1, 2 * N + 1))
    for step in got:
        assert math.isclose(got[step], want[step], rel_tol=2e-4), (step, got[step], want[step])
    assert ckpt.read_state(ckpt.step_dir(run_dir, 2 * N))["step"] == 2 * N
