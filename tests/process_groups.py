"""Run a command that starts more processes (a launcher and its ranks) so that a timeout kills them all.

`subprocess.run(..., timeout=)` kills only the process it started: a launcher's ranks live on, keep
their cores and shared memory, and slow every later test of the session.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time


def run_group(cmd: list[str], *, timeout: float, **popen) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` in a new session; on timeout the whole
    session is killed and TimeoutExpired raised with what it printed."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
        except BaseException:
            kill_group(proc.pid)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(pgid: int) -> None:
    """SIGKILL the whole session; then remove the build lock it may have left (it was the builder:
    the suite builds DeepSpeed's op in its own TORCH_EXTENSIONS_DIR, see conftest.py)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    _wait_gone(pgid)
    from llmtrain.distributed.extensions import check_build_locks

    with contextlib.redirect_stderr(io.StringIO()):
        check_build_locks(clear=True, min_age_s=0)


def _wait_gone(pgid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
