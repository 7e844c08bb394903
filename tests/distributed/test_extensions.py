"""llmtrain.distributed.extensions: stale torch-extension build locks, and the notice while an op builds.

Every test points TORCH_EXTENSIONS_DIR at its own folder; the live "builders" are `sleep` processes
that sit in a build folder, hold its lock open, or name it on their command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmtrain.distributed import extensions, leftovers
from llmtrain.distributed.extensions import (
    LOCK_NAME,
    SHM_COMM_OP,
    building_notice,
    check_build_locks,
    extensions_root,
    find_stale_locks,
)
from llmtrain.errors import UserError

HOUR_AGO = time.time() - 3600


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    return tmp_path / "ext"


def make_lock(root: Path, op: str = SHM_COMM_OP, *, mtime: float | None = HOUR_AGO) -> Path:
    """A build folder as a killed build leaves it: ninja file and lock, no library."""
    folder = root / op
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("build.ninja", LOCK_NAME):
        (folder / name).write_text("")
        if mtime is not None:
            os.utime(folder / name, (mtime, mtime))
    return folder / LOCK_NAME


@pytest.fixture
def live():
    """Start processes that outlive the test body; all are killed at the end."""
    procs = []

    def start(args, **kwargs):
        procs.append(subprocess.Popen(args, **kwargs))
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_root_follows_torch_rule_without_importing_torch(tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch_folder = Path(_get_build_directory("some_op", verbose=False))  # creates the folder
    assert extensions_root() / "some_op" == torch_folder
    # the launcher's path: a fresh interpreter, reading torch's version file instead of importing it
    code = "import sys; from llmtrain.distributed.extensions import extensions_root as r; print(r()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == [str(torch_folder.parent), "False"]


def test_old_lock_without_builder_is_reported_then_cleared(root, capsys):
    lock = make_lock(root)
    assert find_stale_locks() == [lock]
    with pytest.raises(UserError) as err:
        check_build_locks(clear=False)
    assert str(lock) in str(err.value) and f"rm {lock}" in str(err.value)
    assert lock.exists()
    check_build_locks(clear=True)
    assert not lock.exists() and (root / SHM_COMM_OP / "build.ninja").exists()
    assert list((root / SHM_COMM_OP).iterdir()) == [root / SHM_COMM_OP / "build.ninja"]  # nothing set aside
    assert capsys.readouterr().err == (
        f"llmtrain: removed stale build lock {lock} (left by a build that was killed; "
        f"no process is building it)\n"
    )
    check_build_locks(clear=False)  # nothing left to report


def test_fresh_lock_or_recent_build_output_is_not_stale(root):
    make_lock(root, "fresh_op", mtime=None)
    lock = make_lock(root, "busy_op")
    (lock.parent / "busy_op.o").write_text("")  # a build elsewhere (shared cache) just wrote this
    assert find_stale_locks() == []
    assert find_stale_locks(min_age_s=0) == sorted([lock, root / "fresh_op" / LOCK_NAME])
    check_build_locks(clear=False)


def test_lock_is_kept_while_a_live_process_uses_the_folder(root, live):
    in_folder = make_lock(root, "op_cwd")  # ninja / the compiler run with the folder as cwd
    held = make_lock(root, "op_fd")  # the builder holds the lock file open
    named = make_lock(root, "op_arg")  # a process whose command line names the folder
    stale = make_lock(root, "op_arg_longer")  # "op_arg" is a prefix of its name: no match
    live(["sleep", "30"], cwd=in_folder.parent)
    with open(held) as f:
        live(["sleep", "30"], stdin=f)
    live(["sh", "-c", f"sleep 30; : {named.parent}"])
    assert find_stale_locks() == [stale]
    check_build_locks(clear=True)
    assert in_folder.exists() and held.exists() and named.exists() and not stale.exists()


def test_lock_replaced_after_the_check_is_not_removed(root):
    lock = make_lock(root)
    seen = extensions._identity(lock)
    lock.unlink()
    lock.write_text("")  # a new builder took the lock in between
    assert not extensions._remove_if_same(lock, seen)
    assert lock.exists() and sorted(p.name for p in lock.parent.iterdir()) == ["build.ninja", "lock"]


def test_clearing_in_a_fresh_process_returns_quickly(root):
    lock = make_lock(root)
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from llmtrain.distributed.extensions import check_build_locks; check_build_locks(clear=True)",
        ],
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and time.monotonic() - start < 20
    assert f"removed stale build lock {lock}" in result.stderr and not lock.exists()


def test_module_cli_checks_or_clears(root):
    lock = make_lock(root)
    assert leftovers.main(["--check"]) == 2 and lock.exists()
    assert leftovers.main([]) == 0 and not lock.exists()


def test_notice_announces_a_build_once_and_only_when_the_library_is_missing(root, capsys, monkeypatch):
    monkeypatch.setattr(extensions, "_announced", set())
    (root / "built_op").mkdir(parents=True)
    (root / "built_op" / "built_op.so").write_text("")
    with building_notice((SHM_COMM_OP, "built_op")):
        pass
    with building_notice((SHM_COMM_OP, "built_op")):
        pass
    assert capsys.readouterr().err == (
        f"llmtrain: building DeepSpeed's {SHM_COMM_OP} op (first run only, about a minute)...\n"
    )


def test_notice_names_a_lock_held_by_another_process(root, capsys, monkeypatch, live):
    monkeypatch.setattr(extensions, "_announced", {SHM_COMM_OP, "orphan_op"})
    lock = make_lock(root)
    orphan = make_lock(root, "orphan_op", mtime=None)  # a killed build, too recent to be cleared
    with open(lock) as f:
        live(["sleep", "30"], stdin=f)
    err = ""
    with building_notice((SHM_COMM_OP, "orphan_op"), wait_notice_after_s=0.2):
        deadline = time.monotonic() + 10
        while err.count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capsys.readouterr().err
    assert f"llmtrain: waiting for {lock}: another process is building {SHM_COMM_OP}\n" in err
    assert f"llmtrain: waiting for {orphan}: no process is building orphan_op" in err
    assert f"rm {orphan}" in err and err.count("\n") == 2


def test_notice_never_raises_and_its_watcher_stops(root, monkeypatch, capsys):
    monkeypatch.setattr(extensions, "_announced", set())
    with monkeypatch.context() as broken:
        broken.setattr(extensions, "extensions_root", lambda: 1 / 0)
        with building_notice():
            pass
    assert capsys.readouterr().err == ""
    with building_notice(wait_notice_after_s=0.1):
        pass
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "llmtrain-build-lock-watch"]
