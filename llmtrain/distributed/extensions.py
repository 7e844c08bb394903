"""Stale locks of torch's JIT extension builds, and a notice while DeepSpeed builds an op.

DeepSpeed compiles some ops on first use (the CPU communication op `deepspeed_shm_comm` here, fused
optimizers on GPU) with `torch.utils.cpp_extension.load`, in a build folder
`<extensions_root()>/<op name>/`. torch guards the build with `<folder>/lock`, which the builder
creates with O_EXCL (`torch.utils.file_baton.FileBaton`) and removes when done; every other process
polls until the file is gone, forever and in silence. A builder killed mid-build (Ctrl-C, the OOM
killer, a failed rank taking the job down) never removes it, so every later run hangs at start-up.

A lock counts as stale only when both hold:
- nothing in its folder (the lock, the ninja file, objects, the library) changed for `min_age_s`: a
  build in progress writes there, and one op compiles in about a minute;
- no live process on this machine refers to the folder, as /proc shows it: one with a file in it
  open (the builder keeps the lock's descriptor from creating the file until removing it), one whose
  working directory is in it (torch runs ninja there, ninja the compiler and linker), or one whose
  command line names it or a path inside it.
Both lean towards keeping a lock: a shell that merely sits in the folder keeps it, and without
/proc no lock is stale. What /proc cannot show is a builder on another machine sharing the cache on
a network file system, or in another PID namespace sharing the folder: the age test covers those,
since a build that wrote nothing for 10 minutes (the default) is not running.

Call `check_build_locks` once per machine before the ranks start (launch/pretrain.sh does, through
`python -m llmtrain.distributed.leftovers`). Two processes clearing at once are safe: each removes
only the very file it judged stale (same inode and modification time), never a fresh lock that a new
builder took in between.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from llmtrain.errors import UserError

LOCK_NAME = "lock"  # torch: FileBaton(os.path.join(build_directory, "lock"))
LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # torch's LIB_EXT
SHM_COMM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.comm.ShareMemCommBuilder.NAME

# --- where torch builds --------------------------------------------------------------------------


def extensions_root() -> Path:
    """The folder holding one build folder per op, by torch's rule (`_get_build_directory`).

    `$TORCH_EXTENSIONS_DIR` as given when set, else `<user cache>/torch_extensions/py<XY><abiflags>_
    <cpu | cu<XY> | rocm<XY>>`. On Linux and macOS this reads torch's version file instead of
    importing torch (two seconds), so the launcher can call it before any rank starts.
    """
    given = os.environ.get("TORCH_EXTENSIONS_DIR")
    if given is not None:
        return Path(given)
    cuda, hip = _torch_build_versions()
    if hip is not None:
        accelerator = "rocm" + hip.replace(".", "")
    elif cuda is not None:
        accelerator = "cu" + cuda.replace(".", "")
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(_default_build_root()) / f"{python}_{accelerator}"


def _default_build_root() -> str:
    # torch: os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions"))
    if sys.platform == "win32" or "torch.utils.cpp_extension" in sys.modules:
        from torch.utils.cpp_extension import get_default_build_root

        return get_default_build_root()
    if sys.platform == "darwin":
        cache = os.path.expanduser("~/Library/Caches")
    else:
        cache = os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.realpath(os.path.join(cache, "torch_extensions"))


def _torch_build_versions() -> tuple[str | None, str | None]:
    """(torch.version.cuda, torch.version.hip), without importing torch where possible."""
    if "torch" not in sys.modules:
        with contextlib.suppress(Exception):
            values = _constants(_torch_version_file())
            if "cuda" in values and "hip" in values:
                return values["cuda"], values["hip"]
    import torch

    return torch.version.cuda, torch.version.hip


def _torch_version_file() -> Path:
    spec = importlib.util.find_spec("torch")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torch")
    return Path(next(iter(spec.submodule_search_locations))) / "version.py"


def _constants(source: Path) -> dict[str, object]:
    """Top-level `name = <literal>` (or `name: T = <literal>`) assignments of a Python file."""
    values: dict[str, object] = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            values.update({t.id: node.value.value for t in targets if isinstance(t, ast.Name)})
    return values


# --- stale locks ---------------------------------------------------------------------------------


def find_stale_locks(*, min_age_s: float = 600) -> list[Path]:
    """Build locks under `extensions_root()` left by killed builds (see the module docstring)."""
    return list(_stale_locks(min_age_s))


def check_build_locks(*, clear: bool, min_age_s: float = 600) -> None:
    """Remove stale build locks with a warning on stderr (`clear`), or raise a UserError naming them."""
    stale = _stale_locks(min_age_s)
    if not stale:
        return
    if not clear:
        raise UserError(
            f"stale build lock {', '.join(map(str, stale))}: left by a build that was killed; no process "
            f"is building it, and every run would wait for it forever. Remove it: "
            f"rm {' '.join(shlex.quote(str(lock)) for lock in stale)}"
        )
    for lock, seen in stale.items():
        if _remove_if_same(lock, seen):
            _say(
                f"removed stale build lock {lock} (left by a build that was killed; "
                f"no process is building it)"
            )


def _stale_locks(min_age_s: float) -> dict[Path, tuple[int, int, int]]:
    """Stale lock -> the identity of the file judged stale (so clearing removes only that file)."""
    now = time.time()
    old = {}
    for lock in sorted(extensions_root().glob(f"*/{LOCK_NAME}")):
        seen = _identity(lock)
        if seen is not None and now - _last_change(lock) >= min_age_s:
            old[lock] = seen
    if not old or not _can_see_processes():
        return {}
    users = _users([lock.parent for lock in old])
    return {lock: seen for lock, seen in old.items() if not users[lock.parent]}


def _last_change(lock: Path) -> float:
    """Newest modification time among the lock and the files beside it (0 when the lock is gone)."""
    try:
        newest = lock.stat().st_mtime
        with os.scandir(lock.parent) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return time.time()  # gone or unreadable: never stale
    return newest


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _remove_if_same(lock: Path, seen: tuple[int, int, int]) -> bool:
    """Delete `lock` if it is still the file judged stale; False when it is gone or was replaced.

    Two processes may clear at once, and a plain unlink by the later one could delete a fresh lock
    that a new builder took in between. A rename is atomic, so exactly one process takes the file
    away, and it checks what it took before deleting it.
    """
    aside = lock.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False  # another process cleared it
    except OSError as err:
        raise UserError(
            f"cannot remove stale build lock {lock} ({err}): rm {shlex.quote(str(lock))}"
        ) from err
    if _identity(aside) != seen:  # a fresh lock: give it back to its builder
        with contextlib.suppress(OSError):
            os.link(aside, lock)
        os.unlink(aside)
        return False
    os.unlink(aside)
    return True


# --- who uses a build folder (/proc) ---------------------------------------------------------------


def _can_see_processes() -> bool:
    return os.path.isdir("/proc/self/fd")


def _spellings(folder: Path) -> list[str]:
    """The folder as /proc shows it (absolute, symlinks resolved) and as the user may have typed it."""
    return list(dict.fromkeys([os.path.realpath(folder), os.path.abspath(folder), str(folder)]))


def _inside(path: str, spellings: list[str]) -> bool:
    return any(path == s or path.startswith(s.rstrip("/") + "/") for s in spellings)


def _users(folders: list[Path]) -> dict[Path, list[int]]:
    """For each folder, the pids of live processes that refer to it (module docstring)."""
    spellings = {folder: _spellings(folder) for folder in folders}
    # a spelling followed by "/" or the end of an argument, anywhere in it ("-I/x/op/include", "/x/op")
    mentions = {
        folder: re.compile("|".join(re.escape(s.rstrip("/")) + "(?![^/])" for s in names))
        for folder, names in spellings.items()
    }
    users: dict[Path, list[int]] = {folder: [] for folder in folders}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        proc = f"/proc/{entry.name}"
        paths = [_readlink(f"{proc}/cwd")] + _open_files(proc)
        args = _cmdline(proc)
        for folder in folders:
            if any(p and _inside(p, spellings[folder]) for p in paths) or any(
                mentions[folder].search(a) for a in args
            ):
                users[folder].append(int(entry.name))
    return users


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # gone, a zombie, or another user's process
        return ""


def _open_files(proc: str) -> list[str]:
    try:
        fds = os.listdir(f"{proc}/fd")
    except OSError:
        return []
    return [_readlink(f"{proc}/fd/{fd}") for fd in fds]


def _cmdline(proc: str) -> list[str]:
    try:
        with open(f"{proc}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _holds(pid: int, lock: Path) -> bool:
    return any(_inside(p, _spellings(lock)) for p in _open_files(f"/proc/{pid}"))


# --- a notice while an op builds -------------------------------------------------------------------

_announced: set[str] = set()


@contextlib.contextmanager
def building_notice(
    op_names: Iterable[str] = (SHM_COMM_OP,), *, wait_notice_after_s: float = 20.0
) -> Iterator[None]:
    """Wrap the code that may build `op_names` (DeepSpeed's init), so the user is told what happens.

    On entry, for each op whose library is not in its build folder yet: one line on stderr, once per
    process. While inside, a daemon thread watches the build locks: one whose file stays for
    `wait_notice_after_s` while another process is building gets a line naming it (and one with no
    builder at all gets the command that removes it). Never blocks, never raises.
    """
    ops = tuple(op_names)
    stop = threading.Event()
    with contextlib.suppress(Exception):
        root = extensions_root()
        for op in ops:
            if op not in _announced and not _is_built(root / op, op):
                _announced.add(op)
                _say(f"building DeepSpeed's {op} op (first run only, about a minute)...")
        watcher = threading.Thread(
            target=_watch_locks,
            args=(root, ops, wait_notice_after_s, stop),
            name="llmtrain-build-lock-watch",
            daemon=True,
        )
        watcher.start()
    try:
        yield
    finally:
        stop.set()


def _is_built(folder: Path, op: str) -> bool:
    # torch loads <folder>/<name><LIB_EXT>; <name> is op, or op_v<N> after an in-process rebuild
    return (folder / f"{op}{LIB_SUFFIX}").exists() or any(folder.glob(f"{op}_v*{LIB_SUFFIX}"))


def _watch_locks(root: Path, ops: tuple[str, ...], after_s: float, stop: threading.Event) -> None:
    with contextlib.suppress(Exception):
        first_seen: dict[str, tuple[tuple[int, int, int], float]] = {}
        pending = set(ops)
        poll_s = min(1.0, max(after_s / 4, 0.05))
        while pending and not stop.wait(poll_s):
            now = time.monotonic()
            for op in sorted(pending):
                lock = root / op / LOCK_NAME
                seen = _identity(lock)
                if seen is None:
                    first_seen.pop(op, None)
                    continue
                if first_seen.get(op, (None,))[0] != seen:
                    first_seen[op] = (seen, now)
                elif now - first_seen[op][1] >= after_s:
                    pending.discard(op)
                    _report_wait(lock, op)


def _report_wait(lock: Path, op: str) -> None:
    if not _can_see_processes():
        return
    me = os.getpid()
    if _holds(me, lock):
        return  # this process is the builder
    if [pid for pid in _users([lock.parent])[lock.parent] if pid != me]:
        _say(f"waiting for {lock}: another process is building {op}")
    else:
        _say(
            f"waiting for {lock}: no process is building {op}; the lock was left by a build that "
            f"was killed. Remove it: rm {shlex.quote(str(lock))}"
        )


def _say(message: str) -> None:
    print(f"llmtrain: {message}", file=sys.stderr, flush=True)
