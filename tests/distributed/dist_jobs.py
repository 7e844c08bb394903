"""Helpers for real multi-process training jobs on CPU ranks (gloo), started through the real launchers.

Runs are cached per session and reused across assertions: the 2N-step run that saves at step N is
both the reference and the checkpoint a resume starts from (from a copy of its run folder).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from process_groups import run_group

from llmtrain.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
N = 3  # the checkpoint step; runs go to 2N
SHM_DIR = Path("/dev/shm")
# Tiny and fast: fp32 (bit-exact on CPU), a constant lr high enough that 6 steps visibly lower the loss.
BASE = [
    "debug=cpu",
    "model=tiny",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    f"train.max_steps={2 * N}",
    f"checkpoint.every_steps={N}",
    "logging.every_steps=1",
    "logging.progress=false",
    "logging.plot=false",
    f"train.val_every={N}",  # validation under every ZeRO stage, all ranks taking part
    "train.val_batches=2",
    "optim.lr=3e-3",
    "schedule=constant",
    "schedule.warmup_steps=2",
]
_CLEAR = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "NODE_RANK",
    "NPROC_PER_NODE",
    "HOSTFILE",
    "CROSS_RANK",
    "CROSS_SIZE",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAR}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return result


def launcher_cmd(overrides: list[str], *, ranks: int = 2, port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus R --module llmtrain.train ...`, on a free port."""
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port or free_port()),
        "--no_local_rank",
        "--module",
        "llmtrain.train",
        *overrides,
    ]


def deepspeed_job(overrides: list[str], *, ranks: int = 2, cwd: Path, timeout: int = 300, **env: str):
    """`deepspeed --num_gpus R --module llmtrain.train ...` on CPU ranks.

    A job that succeeded must leave none of DeepSpeed's shared-memory segments behind (their names
    end in `_<port>_<rank>`; llmtrain.distributed.shm); those of a failed job are removed.
    """
    port = free_port()
    try:
        cmd = launcher_cmd(overrides, ranks=ranks, port=port)
        result = run_group(cmd, cwd=cwd, env=job_env(**env), timeout=timeout)
    finally:
        left = sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        for segment in left:
            segment.unlink(missing_ok=True)
    if result.returncode == 0:
        assert not left, f"the job left shared-memory segments: {[str(p) for p in left]}"
    return result


def single_job(overrides: list[str], *, cwd: Path, timeout: int = 300):
    """`python -m llmtrain.train ...`: one plain process, no launcher."""
    cmd = [sys.executable, "-m", "llmtrain.train", *overrides]
    return run_group(cmd, cwd=cwd, env=job_env(), timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def grad_norms(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def copy_run(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


class Runs:
    """Session cache of finished runs, keyed by name; each lives in its own folder."""

    def __init__(self, root: Path, data_overrides: list[str]):
        self.root = root
        self.data = data_overrides
        self.cache: dict[str, Path] = {}

    def overrides(self, run_dir: Path, *extra: str) -> list[str]:
        return [*self.data, *BASE, f"run.dir={run_dir}", *extra]

    def reference(self, stage: int, ranks: int = 2) -> Path:
        """2N steps on `ranks` ranks with ZeRO `stage`, checkpointing at N and 2N."""
        name = f"ref_z{stage}_r{ranks}"
        if name not in self.cache:
            run_dir = self.root / name
            ov = self.overrides(run_dir, f"deepspeed.zero_stage={stage}")
            if ranks == 1:
                check(single_job(ov, cwd=self.root))
            else:
                check(deepspeed_job(ov, ranks=ranks, cwd=self.root))
            self.cache[name] = run_dir
        return self.cache[name]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


class Job:
    """A launcher started in its own session, so its process group (id = its pid) holds it, DeepSpeed's
    per-node launcher and every rank; output goes to `<log>.out` / `<log>.err`, readable while it runs.

    The job has ended when the whole group has: the `deepspeed` runner dies at once on a signal to the
    group, while its launcher and the ranks go on (saving, or waiting for a stalled peer).
    """

    def __init__(self, overrides: list[str], *, cwd: Path, log: Path, ranks: int = 2, **env: str):
        self.out_path, self.err_path = log.with_suffix(".out"), log.with_suffix(".err")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                launcher_cmd(overrides, ranks=ranks),
                cwd=cwd,
                env=job_env(**env),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pgid = self.proc.pid

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def running(self) -> bool:
        self.proc.poll()  # reap the runner, which is our child
        return bool(group_members(self.pgid))

    def ranks(self) -> list[int]:
        """The live rank processes (`llmtrain.train` under DeepSpeed's launcher)."""
        found = []
        for pid in group_members(self.pgid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-m" in argv and argv[argv.index(b"-m") + 1 :][:1] == [b"llmtrain.train"]:
                found.append(pid)
        return found

    def signal(self, sig: int) -> None:
        """`sig` to every process of the group (as Ctrl-C, or a scheduler, sends it)."""
        os.killpg(self.pgid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for the whole group to end; the runner's exit code. Kills the group on timeout."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(
                    f"job still running after {timeout:.0f} s\n{self.stdout()[-2000:]}\n{self.stderr()[-4000:]}"
                )
            time.sleep(0.1)
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL whatever is left of the group (stopped processes too) and reap the runner."""
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
        self.proc.wait()
