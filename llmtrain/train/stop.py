"""Stopping on SIGTERM / SIGINT: the first signal asks for a save and a clean exit at the next logging
interval; a second one ends the process within a second, whatever it is doing.

Python runs signal handlers only between bytecodes of the main thread, so a rank blocked in a
collective or a long checkpoint write would not see a second Ctrl-C for as long as that takes. The
C-level handler also writes each signal's number to a wakeup pipe at once, and a watcher thread
reading it exits the process on the second signal.

A signal within `SAME_REQUEST_S` of the first is the same request, not a second one: a signal sent
to the launcher's process group (Ctrl-C in a terminal, a scheduler's SIGTERM to every process)
reaches each rank directly and again, milliseconds later, forwarded by DeepSpeed's launcher.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_REQUEST_S = 0.2


class StopSignal:
    def __init__(self, label: str = "llmtrain train"):
        self.label = label
        self.received: str | None = None
        self._count = 0
        self._first_at = 0.0
        self._lock = threading.Lock()
        self._previous: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._previous_wakeup = -1

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals belong to the main thread; leave them alone
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), name="stop-signal", daemon=True).start()

    def _note(self, signum: int) -> None:
        with self._lock:
            now = time.monotonic()
            if self._count == 1 and now - self._first_at < SAME_REQUEST_S:
                return  # the launcher forwarding what the process group already delivered
            self._count += 1
            count = self._count
            if count == 1:
                self._first_at = now
        if count == 1:
            self.received = signal.Signals(signum).name
        elif count >= 2:
            name = signal.Signals(signum).name
            try:
                os.write(2, f"{self.label}: second {name}: stopping now, without saving\n".encode())
            finally:
                os._exit(128 + signum)

    def _handle(self, signum, frame) -> None:
        # Counted by the watcher (from the wakeup pipe); without one (no pipe), count here.
        if self._pipe is None:
            self._note(signum)
        elif self.received is None:
            self.received = signal.Signals(signum).name

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in (int(s) for s in _SIGNALS):
                    self._note(signum)

    def restore(self) -> None:
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            for fd in reversed(self._pipe):  # the write end first: the watcher reads EOF
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pipe = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        sys.stderr.flush()
