"""optim=muon on 2 CPU ranks: DeepSpeed's MuonWithAuxAdam really orthogonalizes the hidden matrices'
updates at every ZeRO stage (also under ZeRO-3's partitioned build), leaves the embedding to AdamW,
and resumes bit for bit."""

from __future__ import annotations

import pytest
import torch
from dist_jobs import N, check, copy_run, deepspeed_job, losses, single_job

from llmtrain.inference import load_weights
from llmtrain.train import checkpoint as ckpt

pytestmark = pytest.mark.multiprocess
STEPS = 2 * N
MUON = [
    "optim.name=muon",
    "optim.muon_lr=0.05",
    "optim.muon_weight_decay=0",  # the weight change is then -lr * (the orthogonalized update)
    "train.grad_clip=0",  # DeepSpeed would clip the orthogonalized update (refused, see config.validate)
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=10",
]
# The MLP's input matrix, F x D = 256 x 64 in the tiny model. (Attention's matrices have well
# orthogonalized updates too, but their early gradients are so ill-conditioned that five
# Newton-Schulz steps leave the smallest singular values short of one.)
HIDDEN = "blocks.0.mlp.up.weight"
# DeepSpeed torch.compiles its Newton-Schulz step once per matrix shape and rank: ~40 s of a job on
# 2 cores. The tests check what the step computes, so it runs eagerly here.
EAGER = {"TORCH_COMPILE_DISABLE": "1"}


def muon_run(runs, stage: int, *extra: str) -> object:
    name = f"muon_z{stage}" + "".join(f"_{e.split('.')[-1]}" for e in extra)
    if name not in runs.cache:
        run_dir = runs.root / name
        check(
            deepspeed_job(
                runs.overrides(run_dir, f"deepspeed.zero_stage={stage}", *MUON, *extra),
                cwd=runs.root,
                **EAGER,
            )
        )
        runs.cache[name] = run_dir
    return runs.cache[name]


def step_delta(run_dir, name: str, step: int, until: int | None = None) -> torch.Tensor:
    """The change of weight `name` from checkpoint `step` to `until` (default: the next step)."""
    before = load_weights(ckpt.step_dir(run_dir, step))[name]
    after = load_weights(ckpt.step_dir(run_dir, until or step + 1))[name]
    return (after - before).double()


def spread(delta: torch.Tensor) -> float:
    """Largest over smallest singular value: near 1 for an orthogonalized update (Newton-Schulz leaves
    them within about 0.7-1.2), large for Adam's or SGD's."""
    s = torch.linalg.svdvals(delta)
    return float(s.max() / s.min())


def assert_orthogonalized(run_dir) -> None:
    delta = step_delta(run_dir, HIDDEN, N)
    assert spread(delta) < 2.5, spread(delta)
    # magnitude: lr * sqrt(rows / cols) per singular value (DeepSpeed's aspect-ratio scale); the
    # constant schedule is at its peak after the warmup
    s = torch.linalg.svdvals(delta)
    expected = 0.05 * (256 / 64) ** 0.5
    assert 0.5 * expected < float(s.median()) < 1.5 * expected, (float(s.median()), expected)
    # the token embedding stays with AdamW: its update is not orthogonalized
    assert spread(step_delta(run_dir, "tok_emb.weight", N)[:64]) > 10


@pytest.mark.parametrize(
    "stage, extra",
    [
        pytest.param(1, (), id="zero1"),
        pytest.param(3, (), id="zero3-partitioned"),  # zero.Init: every parameter's data looks 1-D
        pytest.param(0, (), marks=pytest.mark.slow, id="zero0"),  # no ZeRO optimizer around Muon
        pytest.param(2, (), marks=pytest.mark.slow, id="zero2"),
        pytest.param(3, ("deepspeed.partitioned_init=false",), marks=pytest.mark.slow, id="zero3-eager"),
    ],
)
def test_muon_orthogonalizes_hidden_updates_and_loss_falls(runs, stage, extra):
    run_dir = muon_run(runs, stage, *extra)
    loss = losses(run_dir)
    assert loss[STEPS] < loss[1] - 0.3, loss
    assert_orthogonalized(run_dir)


def test_adamw_updates_are_not_orthogonal(runs):
    """The control that makes the spread check above meaningful (the AdamW reference saves at N and
    2N only: its update over those N steps)."""
    assert spread(step_delta(runs.reference(1), HIDDEN, N, STEPS)) > 5  # measured 9.0


@pytest.mark.parametrize(
    "stage", [pytest.param(1, id="zero1"), pytest.param(3, marks=pytest.mark.slow, id="zero3")]
)
def test_muon_resume_on_same_ranks_is_bit_exact(runs, stage):
    ref = muon_run(runs, stage)
    run_dir = copy_run(ref, runs.root / f"muon_resume_z{stage}")
    resume = ckpt.step_dir(run_dir, N)
    check(
        deepspeed_job(
            runs.overrides(run_dir, f"deepspeed.zero_stage={stage}", *MUON, f"resume={resume}"),
            cwd=runs.root,
            **EAGER,
        )
    )
    expected, got = losses(ref), losses(run_dir)
    for step in range(N + 1, STEPS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])
    final_ref, final = load_weights(ckpt.step_dir(ref, STEPS)), load_weights(ckpt.step_dir(run_dir, STEPS))
    assert all(torch.equal(final_ref[k], final[k]) for k in final_ref)


def test_muon_resume_onto_another_world_size_is_refused_in_one_line(runs):
    """DeepSpeed's universal conversion keeps AdamW's moments only: Muon's momentum would be lost."""
    run_dir = copy_run(muon_run(runs, 1), runs.root / "muon_resume_r1")
    resume = ckpt.step_dir(run_dir, N)
    job = single_job(
        runs.overrides(run_dir, "deepspeed.zero_stage=1", *MUON, f"resume={resume}"), cwd=runs.root
    )
    assert job.returncode == 2, job.stderr[-2000:]
    assert "optim=muon checkpoint resumes on the world size and ZeRO stage" in job.stderr
    assert "Traceback" not in job.stderr
    assert not resume.with_name(resume.name + ckpt.UNIVERSAL_SUFFIX).exists()
