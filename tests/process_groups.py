"""Run a command that starts more processes (a launcher and its ranks) so that a timeout kills them all.

`subprocess.run(..., timeout=)` kills only the process it started: a launcher's ranks live on, keep
their cores and shared memory, and slow every later test of the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


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
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
