"""llmtrain.distributed.shm: DeepSpeed's shared-memory allreduce segments are released and cleared.

Every real multi-rank job of the suite also checks that it left no segment (dist_jobs.deepspeed_job).
Here the segments live in a temporary folder; a live "rank" is a process that maps one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtrain.distributed import leftovers, shm

HOUR_AGO = time.time() - 3600


@pytest.fixture
def shm_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    return tmp_path


def segment(
    folder: Path, port: int, rank: int, *, uid: int | None = None, mtime: float | None = HOUR_AGO
) -> Path:
    path = folder / f"{shm.PREFIX}_{os.getuid() if uid is None else uid}_127.0.0.1_{port}_{rank}"
    path.write_bytes(b"\0" * 4096)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_segment_name_follows_deepspeed(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert shm.segment_path(3) == Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_10.0.0.7_29511_3")


def test_only_old_unmapped_segments_of_this_user_are_stale(shm_dir):
    left = [segment(shm_dir, 29500, r) for r in (0, 1)]
    fresh = segment(shm_dir, 29501, 0, mtime=None)
    other_user = segment(shm_dir, 29502, 0, uid=os.getuid() + 1)
    in_use = segment(shm_dir, 29503, 0)
    (shm_dir / "unrelated").write_text("")
    code = (
        "import mmap, sys\n"
        f"f = open({str(in_use)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 0)\n"
        "print('mapped', flush=True); sys.stdin.read()\n"
    )
    rank = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert rank.stdout.readline().strip() == "mapped"
        assert shm.stale_segments() == left
        assert shm.clear_stale_segments() == (2, 2 * 4096)
    finally:
        rank.kill()
        rank.wait()
    assert not any(p.exists() for p in left) and fresh.exists() and other_user.exists() and in_use.exists()
    assert shm.stale_segments() == [in_use]  # its "rank" is gone now


def test_release_unlinks_the_own_segment_once(shm_dir, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29600")
    mine, peer = segment(shm_dir, 29600, 0, mtime=None), segment(shm_dir, 29600, 1, mtime=None)
    assert shm.release_own_segment(0, world_size=1) is True
    assert not mine.exists() and peer.exists()
    assert shm.release_own_segment(0, world_size=1) is False


def test_cli_reports_what_it_freed(shm_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    segment(shm_dir, 29700, 0)
    assert leftovers.main([]) == 0
    assert "removed 1 stale DeepSpeed shared-memory segment(s)" in capsys.readouterr().err
    assert leftovers.main([]) == 0 and capsys.readouterr().err == ""
