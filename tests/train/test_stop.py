"""SIGTERM / SIGINT: the first asks the loop to save and stop; a second ends the process at once,
even while the main thread is blocked in a C call (as in a collective or a checkpoint write)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

CHILD = """
import sys, time
from llmtrain.train.stop import StopSignal
stop = StopSignal()
stop.install()
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    time.sleep(0.05)
print("received", stop.received, flush=True)
stop.restore()
"""


def start(seconds: float) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "ready"
    return child


def test_first_signal_is_recorded_and_the_process_goes_on():
    child = start(1.5)
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0 and "received SIGTERM" in out


def test_second_signal_stops_within_a_second():
    child = start(60)
    child.send_signal(signal.SIGINT)
    time.sleep(0.3)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=30)
    assert time.monotonic() - sent < 2.0
    assert child.returncode == 128 + signal.SIGTERM
    assert "second SIGTERM: stopping now, without saving" in err


BLOCKED = """
import os, sys
from llmtrain.train.stop import StopSignal
StopSignal().install()
r, w = os.pipe()
print("ready", flush=True)
os.read(r, 1)  # blocks in C; nothing ever writes
"""


def test_second_signal_stops_a_process_blocked_in_a_c_call():
    child = subprocess.Popen(
        [sys.executable, "-c", BLOCKED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=10)
    assert child.returncode == 128 + signal.SIGTERM
