"""Faults on 2 real CPU ranks under the real `deepspeed` launcher, never mocked: a rank (or the whole
job) killed with SIGKILL at each point of a step and of a save, a stalled rank, a second signal.

A killed job is started again with resume=auto, as a scheduler's requeue would, until it finishes;
then its losses and grad norms must equal those of an uninterrupted run bit for bit at every step
(the metrics file is cut back to the resumed checkpoint and appended), and every checkpoint that
counts (COMPLETE) must verify against its manifest.

The kill moments are drawn from a seeded generator; the seed is printed and set with
LLMTRAIN_FAULT_SEED to replay a failure. `pytest -m slow tests/distributed/test_fault_injection.py`
runs one chain of kills on one run folder (a shard-to-manifest kill, a COMPLETE-to-`latest` kill, a
mid-step kill, then the whole process group killed from outside at a random moment) and 26 trials,
each on a fresh run: 20 over point x step x victim, 4 kills of the whole job, 2 single SIGTERMs. The
default suite keeps the stalled-rank and second-signal tests here, and a killed rank restarted by
launch/pretrain.sh (tests/test_launch.py).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dist_jobs import Job, check, deepspeed_job, grad_norms, losses

from llmtrain.faults import POINTS
from llmtrain.train import checkpoint as ckpt
from llmtrain.train import manifest
from llmtrain.train.metrics import read_metrics

STEPS, EVERY = 8, 2
SAVES = tuple(range(EVERY, STEPS + 1, EVERY))
RUN = [
    "deepspeed.zero_stage=1",
    f"train.max_steps={STEPS}",
    f"checkpoint.every_steps={EVERY}",
    "train.val_every=4",
]
SEED = int(os.environ.get("LLMTRAIN_FAULT_SEED", "20261201"))
JOB_TIMEOUT = 240


def reference(runs) -> Path:
    """The uninterrupted run every trial must end equal to (cached for the session)."""
    if "faults_ref" not in runs.cache:
        run_dir = runs.root / "faults_ref"
        check(deepspeed_job(runs.overrides(run_dir, *RUN), cwd=runs.root))
        runs.cache["faults_ref"] = run_dir
    return runs.cache["faults_ref"]


@dataclass
class Fault:
    point: str
    step: int
    victim: str
    """"0" or "1": that rank; "all": every rank that reaches the point (only rank 0 reaches the
    manifest and `latest`, which it alone writes)."""
    markers: list[Path] = field(default_factory=list)

    def spec(self, marker_dir: Path | None = None) -> str:
        """The LLMTRAIN_FAULT value: with `marker_dir`, each rank fires once over all restarts."""
        ranks = ["0", "1"] if self.victim == "all" else [self.victim]
        if marker_dir is None:
            rank = "" if self.victim == "all" else f":rank={self.victim}"
            return f"{self.point}@{self.step}{rank}"
        self.markers = [marker_dir / f"{self.point}@{self.step}.rank{r}" for r in ranks]
        return ",".join(f"{self.point}@{self.step}:rank={r}:once={m}" for r, m in zip(ranks, self.markers))

    def resumes_from(self) -> int:
        """The step resume=auto continues from after this kill: the checkpoint `latest` names."""
        before = max((s for s in SAVES if s < self.step), default=0)
        if self.point == "save_latest" and before == 0:
            return self.step  # complete, and no `latest` yet that names an older one
        return before

    def __str__(self) -> str:
        who = "every rank" if self.victim == "all" else f"rank {self.victim}"
        return f"SIGKILL of {who} at {self.point}@{self.step}"


def draw(rng: random.Random, point: str) -> Fault:
    step = rng.randint(1, STEPS) if point == "step" else rng.choice(SAVES)
    victims = ("0", "1", "all") if point in ("step", "save_shards") else ("0", "all")
    return Fault(point, step, rng.choice(victims))


# -- what every trial checks ------------------------------------------------------------------------


def counted_checkpoints_verify(run_dir: Path) -> list[int]:
    """Every COMPLETE checkpoint passes the full manifest check; returns their steps."""
    counted = [(step, path) for step, path in ckpt.list_checkpoints(run_dir) if ckpt.is_complete(path)]
    for _, path in counted:
        manifest.verify_all(path)
    return [step for step, _ in counted]


def resumed_step(job: Job) -> int:
    err = job.stderr()
    assert "WARNING: not resuming" not in err, err[-3000:]  # a checkpoint that counted was bad
    found = re.findall(r"resumed from \S*/step_(\d+) at step (\d+)", err)
    assert len(found) <= 1 and all(a == b for a, b in found), found
    return int(found[0][0]) if found else 0


def assert_equals_reference(run_dir: Path, ref: Path, context: str) -> None:
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), (context, steps)  # cut back on resume, then appended
    expected, got = losses(ref), losses(run_dir)
    diff = {s: (got[s], expected[s]) for s in expected if got[s] != expected[s]}
    assert not diff, (context, "loss differs (got, reference)", diff)
    assert grad_norms(run_dir) == grad_norms(ref), context
    assert (ckpt.checkpoints_dir(run_dir) / ckpt.LATEST).read_text() == f"step_{STEPS}", context
    assert counted_checkpoints_verify(run_dir)[-1] == STEPS, context


def start(runs, run_dir: Path, name: str, **env: str) -> Job:
    return Job(runs.overrides(run_dir, *RUN, "resume=auto"), cwd=runs.root, log=run_dir.parent / name, **env)


def crash(runs, run_dir: Path, name: str, fault: Fault, spec: str) -> Job:
    """A run that the fault `spec` kills (at `fault`); returns the ended job."""
    job = start(runs, run_dir, name, LLMTRAIN_FAULT=spec)
    rc = job.wait(JOB_TIMEOUT)
    err = job.stderr()
    fired = re.findall(r"fault injection \(LLMTRAIN_FAULT\): SIGKILL at (\w+)@(\d+) on rank (\d+)", err)
    assert fired and all((p, int(s)) == (fault.point, fault.step) for p, s, _ in fired), (
        str(fault),
        fired,
        err[-3000:],
    )
    assert rc != 0, (str(fault), err[-3000:])
    if fault.victim != "all":
        assert {r for _, _, r in fired} == {fault.victim}, (str(fault), fired)
    return job


def finish(runs, run_dir: Path, name: str, expect_resume: int, context: str, **env: str) -> Job:
    job = start(runs, run_dir, name, **env)
    rc = job.wait(JOB_TIMEOUT)
    assert rc == 0, (context, job.stderr()[-4000:])
    assert resumed_step(job) == expect_resume, (context, job.stderr()[-3000:])
    return job


def kill_at_random_moment(runs, run_dir: Path, name: str, rng: random.Random, after: int) -> int:
    """Start the job (resuming from step `after`), SIGKILL its whole process group at a random moment
    of the training that is left; returns the step resume=auto must continue from."""
    until = rng.randint(after + 1, STEPS - 1)  # then a random moment of the step after it
    fraction = rng.random()
    job = start(runs, run_dir, name)
    try:
        logged: dict[int, float] = {}  # step -> when its console line appeared
        deadline = time.monotonic() + JOB_TIMEOUT
        while until not in logged:
            assert job.running() and time.monotonic() < deadline, job.stderr()[-3000:]
            for step in map(int, re.findall(rf"^step (\d+)/{STEPS} ", job.stdout(), re.M)):
                logged.setdefault(step, time.monotonic())
            time.sleep(0.01)
        step_s = logged[until] - logged.get(until - 1, logged[until] - 0.1)
        time.sleep(fraction * step_s)
        assert job.ranks(), "the job ended before the kill"
        job.signal(signal.SIGKILL)
        job.wait(30)
    finally:
        job.kill()
    print(f"fault trial: SIGKILL of the whole job {fraction * step_s:.2f} s after step {until} was logged")
    assert job.proc.returncode == -signal.SIGKILL
    counted = counted_checkpoints_verify(run_dir)
    named = ckpt.latest_complete(run_dir)
    expected = int(named.name.removeprefix("step_")) if named is not None else 0
    assert expected in (0, *counted) and expected >= after, (expected, counted, after)
    return expected


# -- the chain (slow) and the default suite ---------------------------------------------------------


@pytest.mark.slow  # 3 min of the 20-minute CI budget; the launcher's restart test kills a rank by default
@pytest.mark.multiprocess
def test_killed_ranks_and_job_resume_to_the_same_losses_bit_for_bit(runs):
    """One run folder, killed again and again: between shards and manifest, between COMPLETE and
    `latest`, mid-step, then the whole job from outside; each restart resumes from the checkpoint it
    should, and the run that finishes equals the uninterrupted one bit for bit."""
    ref = reference(runs)
    rng = random.Random(f"{SEED}:chain")
    faults = sorted(
        (draw(rng, point) for point in ("save_shards", "save_latest", "step")),
        key=lambda f: (f.step, POINTS.index(f.point)),
    )
    print(f"fault chain (LLMTRAIN_FAULT_SEED={SEED}): " + "; ".join(map(str, faults)))
    run_dir = runs.root / "faults_chain"
    markers = runs.root / "faults_chain_markers"
    spec = ",".join(f.spec(markers) for f in faults)
    resume = 0
    for i, fault in enumerate(faults):
        context = f"seed {SEED}, kill {i + 1}: {fault}"
        job = crash(runs, run_dir, f"chain{i}", fault, spec)
        assert resumed_step(job) == resume, (context, job.stderr()[-3000:])
        for marker in fault.markers:  # a rank that died of its peer's death first counts as killed
            marker.touch()
        counted_checkpoints_verify(run_dir)
        resume = fault.resumes_from()
    resume = kill_at_random_moment(runs, run_dir, "chain_killpg", rng, after=resume)
    job = finish(runs, run_dir, "chain_final", resume, f"seed {SEED}, after the external kill")
    assert_equals_reference(run_dir, ref, f"seed {SEED}: {'; '.join(map(str, faults))}; external kill")


@pytest.mark.slow  # ~130 s of the CI budget (start, 3 steps, the 20 s timeout, teardown)
@pytest.mark.multiprocess
def test_stalled_rank_fails_the_job_within_the_collective_timeout(runs):
    """Rank 1 stops (SIGSTOP) after step 3: rank 0's next collective times out, rank 0 exits naming
    itself, its phase and the failed collective, and the launcher kills the stopped rank."""
    run_dir = runs.root / "stalled"
    marker = runs.root / "stalled_fired"
    timeout = 20
    job = Job(
        runs.overrides(run_dir, *RUN, "train.max_steps=1000", f"train.collective_timeout_s={timeout}"),
        cwd=runs.root,
        log=runs.root / "stalled",
        LLMTRAIN_FAULT=f"step@3:rank=1:signal=STOP:once={marker}",
    )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not marker.exists():
            assert job.running() and time.monotonic() < deadline, job.stderr()[-3000:]
            time.sleep(0.05)
        stalled = time.monotonic()
        rc = job.wait(timeout + 100)
        took = time.monotonic() - stalled
    finally:
        job.kill()
    err = job.stderr()
    print(f"stalled rank: every process gone {took:.1f} s after the stall, rc {rc}")
    assert rc != 0, err[-3000:]
    assert took < 90, (took, err[-3000:])
    lines = [ln for ln in err.splitlines() if "rank 0:" in ln and "a collective failed" in ln]
    assert len(lines) == 1, err[-3000:]
    assert "step 3" in lines[0] and f"collective_timeout_s={timeout}" in lines[0], lines


@pytest.mark.slow  # a fault trial: 88 s of the CI budget in the last rehearsal
@pytest.mark.multiprocess
def test_second_sigterm_ends_the_job_at_once(runs):
    """SIGTERM to the job's process group, as a scheduler sends it: every rank gets it directly and
    again from DeepSpeed's launcher, which is one request (the job goes on to its next logging step,
    here far away); a second SIGTERM a second later ends every process within seconds, unsaved."""
    run_dir = runs.root / "second_signal"
    markers = [runs.root / f"second_signal_r{r}" for r in (0, 1)]
    # SIGCONT to itself is harmless: the markers say both ranks are in the loop, handlers installed.
    ready = ",".join(f"step@2:rank={r}:once={m}:signal=CONT" for r, m in enumerate(markers))
    job = Job(
        runs.overrides(
            run_dir, *RUN, "train.max_steps=100000", "logging.every_steps=100000", "checkpoint.every_steps=0"
        ),
        cwd=runs.root,
        log=runs.root / "second_signal",
        LLMTRAIN_FAULT=ready,
    )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not all(m.exists() for m in markers):
            assert job.running() and time.monotonic() < deadline, job.stderr()[-3000:]
            time.sleep(0.05)
        job.signal(signal.SIGTERM)
        time.sleep(1.0)
        ranks_alive = len(job.ranks())
        job.signal(signal.SIGTERM)
        second = time.monotonic()
        job.wait(60)
        took = time.monotonic() - second
    finally:
        job.kill()
    err = job.stderr()
    print(f"second SIGTERM: every process gone {took:.1f} s after it")
    assert ranks_alive == 2, ("the first SIGTERM alone ended a rank", err[-3000:])
    assert took < 15, (took, err[-3000:])
    assert err.count("second SIGTERM: stopping now, without saving") >= 1, err[-3000:]
    assert ckpt.latest_complete(run_dir) is None


# -- the slow trials ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_random_kill_then_resume_is_bit_exact(runs, trial):
    """One fault at a random (point, step, victim); one restart with resume=auto finishes the run."""
    ref = reference(runs)
    rng = random.Random(f"{SEED}:{trial}")
    fault = draw(rng, rng.choice(POINTS))
    context = f"trial {trial} (LLMTRAIN_FAULT_SEED={SEED}): {fault}"
    print(context)
    run_dir = runs.root / f"faults_trial{trial}"
    crash(runs, run_dir, f"trial{trial}_crash", fault, fault.spec())
    counted_checkpoints_verify(run_dir)
    finish(runs, run_dir, f"trial{trial}_resume", fault.resumes_from(), context)
    assert_equals_reference(run_dir, ref, context)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(4))
def test_job_killed_from_outside_at_a_random_moment_resumes_bit_exact(runs, trial):
    ref = reference(runs)
    rng = random.Random(f"{SEED}:external{trial}")
    run_dir = runs.root / f"faults_external{trial}"
    resume = kill_at_random_moment(runs, run_dir, f"external{trial}_kill", rng, after=0)
    finish(runs, run_dir, f"external{trial}_resume", resume, f"external trial {trial}, seed {SEED}")
    assert_equals_reference(run_dir, ref, f"external trial {trial}, seed {SEED}")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(2))
def test_one_sigterm_to_the_job_saves_and_the_restart_is_bit_exact(runs, trial):
    """SIGTERM to the whole process group (each rank gets it twice: directly and from the launcher):
    the ranks save at the next logging step and exit; resume=auto continues from that step."""
    ref = reference(runs)
    rng = random.Random(f"{SEED}:sigterm{trial}")
    after = rng.randint(1, STEPS - 2)
    run_dir = runs.root / f"faults_sigterm{trial}"
    job = start(runs, run_dir, f"sigterm{trial}")
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while f"step {after}/{STEPS} " not in job.stdout():
            assert job.running() and time.monotonic() < deadline, job.stderr()[-3000:]
            time.sleep(0.01)
        job.signal(signal.SIGTERM)
        job.wait(60)
    finally:
        job.kill()
    err = job.stderr()
    saved = re.findall(r"SIGTERM: saved step (\d+), exiting", err)
    assert saved and int(saved[0]) >= after, (after, err[-3000:])
    assert "second SIGTERM" not in err, err[-3000:]
    stopped = int(saved[0])
    assert stopped in counted_checkpoints_verify(run_dir)
    context = f"sigterm trial {trial}, seed {SEED}: SIGTERM after step {after}, saved {stopped}"
    finish(runs, run_dir, f"sigterm{trial}_resume", stopped, context)
    assert_equals_reference(run_dir, ref, context)
