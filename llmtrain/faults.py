"""Fault injection for the reliability tests: a rank dies (or stalls) at a chosen point of a step.

The trainer calls `maybe_fail(point, step)` at the points below; with `LLMTRAIN_FAULT` unset that
costs one dict lookup. The variable holds one or more comma-separated specs
    POINT@STEP[:rank=R][:once=MARKER][:signal=NAME | :sleep=SECONDS | :nan]
e.g. `LLMTRAIN_FAULT=step@4:rank=1:once=/tmp/fired` kills rank 1 right after optimizer step 4, once:
a job restarted from its checkpoint runs through; `loss@3:rank=1:nan` blows up rank 1's loss of step 3.

    POINT          where the trainer calls maybe_fail(POINT, STEP)
      step           optimizer step STEP completed, before logging and saving
      save_shards    every rank has written its DeepSpeed files for step STEP, before the manifest
      save_manifest  the manifest of step STEP is written, before COMPLETE and `latest`
      save_latest    COMPLETE is written, before `latest` moves to step STEP
      convert        rank 0 is about to convert the checkpoint of step STEP to the universal format
      loss           the first micro-batch of optimizer step STEP has its loss, before the backward
    rank=R         only the process whose RANK (environment, default 0) is R; else every rank
    once=MARKER    only if the file MARKER does not exist; it is created (O_EXCL) before the signal,
                   so exactly one process of all ranks and restarts fires. The path can hold
                   neither ":" nor ",".
    signal=NAME    KILL (default), or another signal: STOP stalls the process (a hung rank, which
                   SIGCONT resumes), TERM, INT, ...
    sleep=SECONDS  instead of a signal, pause this long (a slow rank, e.g. a long conversion)
    nan            instead of a signal, the trainer makes that value non-finite (at `loss`: NaN
                   gradients on that rank only, as when one rank's batch blows up)

A malformed spec or an unknown point is a UserError naming it, at the first call.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmtrain.errors import UserError

ENV = "LLMTRAIN_FAULT"
POINTS = ("step", "save_shards", "save_manifest", "save_latest", "convert", "loss")


@dataclass(frozen=True)
class Fault:
    point: str
    step: int
    rank: int | None = None
    """None: every rank."""
    once: str | None = None
    """Marker file: fire only if it does not exist yet (and create it)."""
    signal: signal.Signals = signal.SIGKILL
    sleep: float | None = None
    """Seconds to pause instead of sending `signal`."""
    nan: bool = False
    """Instead of a signal: `maybe_fail` returns True and the caller poisons its value."""


def parse_faults(text: str) -> list[Fault]:
    """The faults of a LLMTRAIN_FAULT value ("" -> none)."""
    return [_parse_one(spec.strip()) for spec in text.split(",") if spec.strip()]


def _parse_one(spec: str) -> Fault:
    def bad(why: str) -> UserError:
        return UserError(
            f"{ENV}: bad fault {spec!r}: {why} "
            "(format: POINT@STEP[:rank=R][:once=PATH][:signal=NAME | :sleep=SECONDS | :nan])"
        )

    head, *options = spec.split(":")
    point, at, step = head.partition("@")
    if not at or not step.isdigit():
        raise bad("expected POINT@STEP with a step number")
    if point not in POINTS:
        raise bad(f"unknown point {point!r}; points: {', '.join(POINTS)}")
    fields: dict[str, object] = {}
    for option in options:
        if option == "nan" and "nan" not in fields:
            fields["nan"] = True
            continue
        key, eq, value = option.partition("=")
        if not eq or not value or key in fields:
            raise bad(
                f"option {option!r}: expected rank=R, once=PATH, signal=NAME or sleep=SECONDS, each once"
            )
        if key == "rank":
            if not value.isdigit():
                raise bad(f"rank {value!r} is not a rank number")
            fields[key] = int(value)
        elif key == "once":
            fields[key] = value
        elif key == "signal":
            sig = signal.Signals.__members__.get("SIG" + value.upper().removeprefix("SIG"))
            if sig is None:
                raise bad(f"unknown signal {value!r}")
            fields[key] = sig
        elif key == "sleep":
            try:
                fields[key] = float(value)
            except ValueError:
                raise bad(f"sleep {value!r} is not a number of seconds") from None
        else:
            raise bad(f"unknown option {key!r}")
    if sum(key in fields for key in ("signal", "sleep", "nan")) > 1:
        raise bad("signal, sleep and nan exclude each other")
    return Fault(point=point, step=int(step), **fields)  # type: ignore[arg-type]


_plan: dict[str, list[Fault]] | None = None  # point -> faults, from the environment, read once


def _load_plan() -> dict[str, list[Fault]]:
    global _plan
    plan: dict[str, list[Fault]] = {}
    for fault in parse_faults(os.environ.get(ENV, "")):
        plan.setdefault(fault.point, []).append(fault)
    _plan = plan
    return plan


def maybe_fail(point: str, step: int) -> bool:
    """Send this process the signal of a LLMTRAIN_FAULT spec that matches (point, step, RANK); True
    when the matching spec is a `nan` one, which the caller carries out."""
    plan = _plan if _plan is not None else _load_plan()
    faults = plan.get(point)
    if not faults:
        return False
    rank = int(os.environ.get("RANK", "0"))
    for fault in faults:
        if fault.step == step and fault.rank in (None, rank) and _claim(fault, rank):
            what = (
                "nan"
                if fault.nan
                else f"sleep {fault.sleep:g} s"
                if fault.sleep is not None
                else fault.signal.name
            )
            print(
                f"llmtrain: fault injection ({ENV}): {what} at {point}@{step} on rank {rank} (pid {os.getpid()})",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            if fault.nan:
                return True
            if fault.sleep is not None:
                time.sleep(fault.sleep)
            else:
                os.kill(os.getpid(), fault.signal)  # KILL does not return; STOP returns on SIGCONT
    return False


def _claim(fault: Fault, rank: int) -> bool:
    """True if the fault fires now: it has no marker, or this process created the marker."""
    if fault.once is None:
        return True
    marker = Path(fault.once)
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, f"{fault.point}@{fault.step} rank {rank} pid {os.getpid()}\n".encode())
        os.fsync(fd)  # the marker must outlive the process it kills
    finally:
        os.close(fd)
    return True
