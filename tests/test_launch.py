"""launch/: shell syntax, config validation before any rank starts, and the deepspeed command each
mode builds (DRY_RUN=1 prints it instead of starting ranks)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from process_groups import run_group

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = ROOT / "launch" / "pretrain.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
LAUNCH_VARS = (
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "HOSTFILE",
    "NPROC_PER_NODE",
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "DEEPSPEED_ARGS",
    "DRY_RUN",
    "MAX_RESTARTS",
    "RESTART_DELAY_S",
    "LLMTRAIN_FAULT",
)


def run_script(
    script: Path, *args: str, cwd: Path, path_prefix: Path | None = None, timeout: float = 120, **env: str
):
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    # the venv's bin (deepspeed, python) first, as after `source .venv/bin/activate`
    bins = [str(Path(sys.executable).parent)] + ([str(path_prefix)] if path_prefix else [])
    environ["PATH"] = os.pathsep.join(bins + [environ.get("PATH", "")])
    environ.update(env)
    return run_group([str(script), *args], cwd=cwd, env=environ, timeout=timeout)


def command_of(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", [PRETRAIN, SBATCH], ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)


def test_bad_override_fails_before_any_rank_starts(tmp_path):
    result = run_script(PRETRAIN, "optim.lrr=1", "run.name=bad", cwd=tmp_path)
    assert result.returncode == 2
    assert "pretrain.sh: error:" in result.stderr and "optim.lrr" in result.stderr
    assert "Traceback" not in result.stderr
    assert "rank(s) per node" not in result.stderr  # never reached the launch step
    assert not (tmp_path / "runs").exists()
    result = run_script(PRETRAIN, "debug=null", cwd=tmp_path)  # Hydra raises ValueError here
    assert (
        result.returncode == 2 and "pretrain.sh: error:" in result.stderr and "Traceback" not in result.stderr
    )


def test_batch_that_does_not_divide_the_world_names_the_key(tmp_path):
    result = run_script(
        PRETRAIN, "train.global_batch_size=12", cwd=tmp_path, DS_ACCELERATOR="cpu", NPROC_PER_NODE="2"
    )
    assert result.returncode == 2
    assert "train.global_batch_size=12" in result.stderr and "data-parallel world 2" in result.stderr


def test_cpu_single_node_defaults(tmp_path):
    cmd = command_of(run_script(PRETRAIN, "run.name=x", cwd=tmp_path, DS_ACCELERATOR="cpu", DRY_RUN="1"))
    assert cmd[:3] == ["deepspeed", "--num_gpus", "2"]
    assert cmd[-4:] == ["--module", "llmtrain.train", "debug=cpu", "run.name=x"]
    assert "--no_local_rank" in cmd and "--master_port" in cmd


def test_user_debug_choice_is_kept_and_nproc_is_honoured(tmp_path):
    result = run_script(
        PRETRAIN,
        "~debug",
        "model=tiny",
        "train.seq_len=128",
        cwd=tmp_path,
        DS_ACCELERATOR="cpu",
        NPROC_PER_NODE="3",
        DRY_RUN="1",
        MASTER_PORT="29612",
    )
    cmd = command_of(result)
    assert cmd[1:3] == ["--num_gpus", "3"] and "debug=cpu" not in cmd and cmd[-3] == "~debug"
    assert cmd[cmd.index("--master_port") + 1] == "29612"
    assert "world 3" in result.stderr and "OMP_NUM_THREADS=" in result.stderr


def test_one_launch_per_node_generates_a_hostfile(tmp_path):
    result = run_script(
        PRETRAIN,
        cwd=tmp_path,
        DS_ACCELERATOR="cpu",
        DRY_RUN="1",
        NNODES="2",
        NODE_RANK="1",
        TMPDIR=str(tmp_path),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29613",
    )
    cmd = command_of(result)
    i = cmd.index("--no_ssh")
    assert cmd[i + 1 : i + 7] == ["--node_rank", "1", "--master_addr", "127.0.0.1", "--master_port", "29613"]
    assert cmd[1] == "--hostfile"
    assert Path(cmd[2]).read_text() == "node0 slots=2\nnode1 slots=2\n"
    assert "world 4" in result.stderr


def test_multi_node_needs_master_addr_and_valid_rank(tmp_path):
    result = run_script(PRETRAIN, cwd=tmp_path, DS_ACCELERATOR="cpu", NNODES="2")
    assert result.returncode == 2 and "MASTER_ADDR" in result.stderr
    result = run_script(
        PRETRAIN, cwd=tmp_path, DS_ACCELERATOR="cpu", NNODES="2", NODE_RANK="2", MASTER_ADDR="h"
    )
    assert result.returncode == 2 and "NODE_RANK=2" in result.stderr


def test_hostfile_over_ssh_counts_slots(tmp_path):
    result = run_script(
        PRETRAIN,
        "model=tiny",
        cwd=tmp_path,
        DS_ACCELERATOR="cpu",
        DRY_RUN="1",
        HOSTFILE=str(ROOT / "launch" / "hostfile.example"),
    )
    cmd = command_of(result)
    assert cmd[1:3] == ["--hostfile", str(ROOT / "launch" / "hostfile.example")]
    assert "--no_ssh" not in cmd and "world 16" in result.stderr


def test_slurm_script_maps_slurm_variables(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir(parents=True)
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'nodeA\\nnodeB\\n'\n")
    # srun stand-in: one task, as SLURM would start on the second node
    (fake / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n'
    )
    for f in fake.iterdir():
        f.chmod(0o755)
    result = run_script(
        SBATCH,
        "model=tiny",
        cwd=tmp_path,
        path_prefix=fake,
        DS_ACCELERATOR="cpu",
        DRY_RUN="1",
        LLMTRAIN_ROOT=str(ROOT),
        SLURM_JOB_ID="1234",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[A-B]",
    )
    cmd = command_of(result)
    i = cmd.index("--no_ssh")
    assert cmd[i + 1 : i + 7] == ["--node_rank", "1", "--master_addr", "nodeA", "--master_port", "21234"]
    assert cmd[-1] == "model=tiny"


LAUNCH_RUN = [
    "model=tiny",
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "run.name=launch",
    "logging.every_steps=2",
    "train.val_every=4",
    "checkpoint.every_steps=4",
    "schedule.total_steps=8",
]
LAUNCH_ENV = {"DS_ACCELERATOR": "cpu", "NPROC_PER_NODE": "2", "MASTER_PORT": "29641"}


def launch_four_steps(prepared_data, tmp_path) -> Path:
    common = [*prepared_data.overrides, *LAUNCH_RUN]
    first = run_script(PRETRAIN, *common, "train.max_steps=4", cwd=tmp_path, timeout=360, **LAUNCH_ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "launch"
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in train)
    assert (run_dir / "checkpoints" / "step_4").is_dir()
    return run_dir


@pytest.mark.timeout(600)
@pytest.mark.multiprocess
def test_pretrain_sh_trains_on_two_cpu_ranks(prepared_data, tmp_path):
    """The real launcher end to end: 2 gloo ranks train, log, validate and checkpoint."""
    run_dir = launch_four_steps(prepared_data, tmp_path)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r] == [4]
    assert (run_dir / "loss_curve.png").stat().st_size > 0


@pytest.mark.timeout(900)  # two real launches; slow on a loaded 2-core machine
@pytest.mark.multiprocess
@pytest.mark.slow  # resuming on 2 ranks is in tests/distributed; this adds the launcher around it
def test_pretrain_sh_trains_on_two_cpu_ranks_and_resumes(prepared_data, tmp_path):
    """An extended run through the launcher resumes and appends to the first run's records."""
    run_dir = launch_four_steps(prepared_data, tmp_path)
    before = read_jsonl(run_dir / "metrics.jsonl")
    common = [*prepared_data.overrides, *LAUNCH_RUN]
    second = run_script(PRETRAIN, *common, "train.max_steps=8", cwd=tmp_path, timeout=360, **LAUNCH_ENV)
    assert second.returncode == 0, second.stderr[-3000:]
    records = read_jsonl(run_dir / "metrics.jsonl")
    # the resumed run kept the first run's records (timings differ between runs, so a rerun from
    # step 0 would have rewritten them) and appended its own
    assert records[: len(before)] == before
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert (run_dir / "checkpoints" / "step_8").is_dir()


# A stand-in for the deepspeed launcher: appends its arguments to $FAKE_DIR/calls and exits with the
# next code of $FAKE_CODES (one per call); "hang" starts a "rank" and waits for a signal instead.
FAKE_DEEPSPEED = r"""#!/usr/bin/env bash
echo "$*" >>"$FAKE_DIR/calls"
codes=($FAKE_CODES)
code=${codes[$(($(wc -l <"$FAKE_DIR/calls") - 1))]:-0}
if [[ "$code" == hang ]]; then
    sleep 60 &
    echo $! >"$FAKE_DIR/rank_pid"
    trap 'echo TERM >>"$FAKE_DIR/signals"; exit 143' TERM
    touch "$FAKE_DIR/started"
    while :; do sleep 0.05; done
fi
exit "$code"
"""


def fake_launcher(tmp_path: Path, codes: str) -> dict[str, str]:
    """Environment for run_script: the fake `deepspeed` first on PATH, CPU mode, no restart delay."""
    fake = tmp_path / "fake"
    fake.mkdir(parents=True)
    (fake / "deepspeed").write_text(FAKE_DEEPSPEED)
    (fake / "deepspeed").chmod(0o755)
    path = os.pathsep.join([str(fake), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        "PATH": path,
        "FAKE_DIR": str(fake),
        "FAKE_CODES": codes,
        "DS_ACCELERATOR": "cpu",
        "RESTART_DELAY_S": "0",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
    }


def calls(env: dict[str, str]) -> list[list[str]]:
    return [line.split() for line in (Path(env["FAKE_DIR"]) / "calls").read_text().splitlines()]


def test_restart_settings_keep_the_dry_run_command_and_are_checked(tmp_path):
    plain = command_of(run_script(PRETRAIN, "run.name=x", cwd=tmp_path, DS_ACCELERATOR="cpu", DRY_RUN="1"))
    result = run_script(
        PRETRAIN, "run.name=x", cwd=tmp_path, DS_ACCELERATOR="cpu", DRY_RUN="1", MAX_RESTARTS="2"
    )
    assert command_of(result) == plain and "up to 2 restart(s)" in result.stderr
    for var, value in (("MAX_RESTARTS", "-1"), ("MAX_RESTARTS", "x"), ("RESTART_DELAY_S", "soon")):
        result = run_script(PRETRAIN, cwd=tmp_path, DS_ACCELERATOR="cpu", DRY_RUN="1", **{var: value})
        assert result.returncode == 2 and f"{var}={value}" in result.stderr


def test_failed_attempt_restarts_with_resume_auto(tmp_path):
    env = fake_launcher(tmp_path, "247 0")
    result = run_script(PRETRAIN, "run.name=x", "resume=none", cwd=tmp_path, MAX_RESTARTS="2", **env)
    assert result.returncode == 0, result.stderr
    assert (
        "pretrain.sh: attempt 1/3 failed with exit code 247; restarting from the newest verified "
        "checkpoint (resume=auto)" in result.stderr
    )
    first, second = calls(env)
    assert first[-2:] == ["run.name=x", "resume=none"]
    assert second == first + ["resume=auto"]  # the later override wins


def test_user_error_is_not_restarted_and_restarts_run_out(tmp_path):
    env = fake_launcher(tmp_path, "2")
    result = run_script(PRETRAIN, cwd=tmp_path, MAX_RESTARTS="3", **env)
    assert result.returncode == 2 and len(calls(env)) == 1
    assert "attempt 1/4 failed with exit code 2 (a configuration or input error" in result.stderr
    env = fake_launcher(tmp_path / "again", "5 6 0")
    result = run_script(PRETRAIN, cwd=tmp_path, MAX_RESTARTS="1", **env)
    assert result.returncode == 6 and len(calls(env)) == 2
    assert "attempt 2/2 failed with exit code 6; no restarts left" in result.stderr


def test_sigterm_reaches_launcher_and_ranks_and_is_not_restarted(tmp_path):
    import signal
    import time

    env = fake_launcher(tmp_path, "hang 0")
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    environ.update(env, MAX_RESTARTS="2")
    proc = subprocess.Popen([str(PRETRAIN)], cwd=tmp_path, env=environ, stderr=subprocess.PIPE, text=True)
    fake = Path(env["FAKE_DIR"])
    try:
        deadline = time.monotonic() + 60
        while not (fake / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM; not restarting" in err and "restarting from" not in err
    assert (fake / "signals").read_text() == "TERM\n" and len(calls(env)) == 1
    rank = int((fake / "rank_pid").read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{rank}").exists() or "Z" in Path(f"/proc/{rank}/stat").read_text().split()[2]


def test_launcher_clears_a_stale_build_lock_first(tmp_path):
    env = fake_launcher(tmp_path, "0")
    lock = Path(env["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    os.utime(lock, (0, 0))
    result = run_script(PRETRAIN, cwd=tmp_path, **env)  # MAX_RESTARTS unset: exec
    assert result.returncode == 0 and len(calls(env)) == 1
    assert f"llmtrain: removed stale build lock {lock}" in result.stderr and not lock.exists()


@pytest.mark.timeout(900)  # two real launches; slow on a loaded 2-core machine
@pytest.mark.multiprocess
def test_pretrain_sh_restarts_after_a_killed_rank(prepared_data, tmp_path):
    """Rank 1 is killed right after step 4 (once); the restart resumes from step 3 and finishes."""
    overrides = [
        *prepared_data.overrides,
        "model=tiny",
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "run.name=restart",
        "logging.every_steps=1",
        "checkpoint.every_steps=3",
        "schedule.total_steps=6",
        "train.max_steps=6",
    ]
    env = {
        "DS_ACCELERATOR": "cpu",
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": "29642",
        "MAX_RESTARTS": "1",
        "RESTART_DELAY_S": "0",
        "LLMTRAIN_FAULT": f"step@4:rank=1:once={tmp_path / 'fired'}",
    }
    result = run_script(PRETRAIN, *overrides, cwd=tmp_path, timeout=480, **env)  # two launches
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fired").exists()
    assert "attempt 1/2 failed with exit code" in result.stderr
    assert "restarting from the newest verified checkpoint (resume=auto)" in result.stderr
    steps = [r["step"] for r in read_jsonl(tmp_path / "runs" / "restart" / "metrics.jsonl") if "loss" in r]
    assert max(steps) == 6 and 6 in steps


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]
