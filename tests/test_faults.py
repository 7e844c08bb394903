"""llmtrain.faults: LLMTRAIN_FAULT parsing, and processes that kill or stop themselves on cue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from llmtrain import faults
from llmtrain.errors import UserError
from llmtrain.faults import Fault, parse_faults

# a stand-in for the trainer: five steps, each announced after maybe_fail let it through
LOOP = "from llmtrain.faults import maybe_fail\nfor s in range(1, 6):\n    maybe_fail('step', s)\n    print(s, flush=True)\n"


def run_loop(fault: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", faults.ENV)}
    environ.update({faults.ENV: fault, **env})
    return subprocess.run(
        [sys.executable, "-c", LOOP], env=environ, capture_output=True, text=True, timeout=60
    )


def test_specs_parse_with_their_options():
    assert parse_faults("") == []
    assert parse_faults("step@4") == [Fault("step", 4)]
    assert parse_faults("step@4:rank=1:once=/tmp/x/fired, save_manifest@6:signal=STOP") == [
        Fault("step", 4, rank=1, once="/tmp/x/fired"),
        Fault("save_manifest", 6, signal=signal.SIGSTOP),
    ]
    assert parse_faults("save_latest@2:signal=sigterm")[0].signal is signal.SIGTERM
    assert parse_faults("convert@3:rank=0:sleep=2.5") == [Fault("convert", 3, rank=0, sleep=2.5)]
    assert parse_faults("loss@3:rank=1:nan") == [Fault("loss", 3, rank=1, nan=True)]


@pytest.mark.parametrize(
    "spec, why",
    [
        ("step", "POINT@STEP"),
        ("step@x", "POINT@STEP"),
        ("stpe@3", "unknown point 'stpe'"),
        ("step@3:rank=one", "rank 'one'"),
        ("step@3:rank=1:rank=2", "each once"),
        ("step@3:when=now", "unknown option 'when'"),
        ("step@3:signal=BOGUS", "unknown signal 'BOGUS'"),
        ("step@3:sleep=long", "sleep 'long' is not a number"),
        ("step@3:sleep=1:signal=TERM", "signal, sleep and nan exclude each other"),
        ("loss@3:nan:sleep=1", "signal, sleep and nan exclude each other"),
    ],
)
def test_malformed_spec_names_the_variable_and_the_spec(spec, why):
    with pytest.raises(UserError, match="LLMTRAIN_FAULT") as err:
        parse_faults(f"step@1,{spec}")
    assert repr(spec) in str(err.value) and why in str(err.value)


def test_a_nan_fault_fires_once_for_its_rank_and_step_and_tells_the_caller(monkeypatch, capsys):
    monkeypatch.setenv(faults.ENV, "loss@3:rank=1:nan")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(faults, "_plan", None)
    assert [faults.maybe_fail("loss", step) for step in (1, 2, 3, 4)] == [False, False, True, False]
    assert not faults.maybe_fail("step", 3)
    assert "nan at loss@3 on rank 1" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(faults, "_plan", None)
    assert not faults.maybe_fail("loss", 3)


def test_unset_variable_never_fires(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    monkeypatch.setattr(faults, "_plan", None)
    for step in range(10):
        faults.maybe_fail("step", step)
    assert faults._plan == {}


def test_sleep_pauses_instead_of_a_signal():
    result = run_loop("step@2:sleep=0.5")
    assert result.returncode == 0 and result.stdout.split() == ["1", "2", "3", "4", "5"]
    assert "sleep 0.5 s at step@2 on rank 0" in result.stderr


def test_process_is_killed_right_at_the_step():
    result = run_loop("step@3")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["1", "2"]
    assert "SIGKILL at step@3 on rank 0" in result.stderr


def test_only_the_named_rank_dies():
    assert run_loop("step@3:rank=1", RANK="0").stdout.split() == ["1", "2", "3", "4", "5"]
    result = run_loop("save_shards@3,step@4:rank=1", RANK="1")
    assert result.returncode == -signal.SIGKILL and result.stdout.split() == ["1", "2", "3"]


def test_once_fires_on_the_first_run_only(tmp_path):
    marker = tmp_path / "faults" / "fired"
    first = run_loop(f"step@2:once={marker}")
    assert first.returncode == -signal.SIGKILL and first.stdout.split() == ["1"]
    assert marker.read_text().startswith("step@2 rank 0")
    second = run_loop(f"step@2:once={marker}")  # the restarted job
    assert second.returncode == 0 and second.stdout.split() == ["1", "2", "3", "4", "5"]


def test_stop_signal_stalls_the_process_until_continued():
    environ = {k: v for k, v in os.environ.items() if k != "RANK"}
    environ[faults.ENV] = "step@2:signal=STOP"
    proc = subprocess.Popen([sys.executable, "-c", LOOP], env=environ, stdout=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        assert proc.stdout.readline().strip() == "1"
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.stdout.read().split() == ["2", "3", "4", "5"]
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
