"""No host synchronisation from llmtrain's own code between logging steps.

On a GPU every `.item()`, `.tolist()`, `bool(tensor)`, `float(tensor)` or copy to the host waits for
the device to finish all queued work; one per step is enough to idle the GPU between steps. On CPU
they cost nothing, so timing cannot show them: this test counts them instead. It wraps those
tensor methods, runs a real training loop (in this process, ZeRO-1) and attributes each call to the
first frame outside torch: llmtrain's calls may only come after a logging step (the one agreed
all-reduce of the interval); DeepSpeed's own are counted and shown (see docs/performance.md).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from trainer_runs import TINY_RUN, train

from llmtrain import faults

LLMTRAIN = str(Path(__file__).resolve().parents[2] / "llmtrain")
TORCH = str(Path(torch.__file__).parent)
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")


def _owner(frame) -> tuple[str, str] | None:
    """(who, where) of the first caller outside torch: who is llmtrain, deepspeed or other."""
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    if frame is None:
        return None
    path = frame.f_code.co_filename
    who = "llmtrain" if path.startswith(LLMTRAIN) else "deepspeed" if "/deepspeed/" in path else "other"
    return who, f"{Path(path).name}:{frame.f_lineno} {frame.f_code.co_name}"


def test_no_llmtrain_host_sync_between_logging_steps(prepared_data, tmp_path, monkeypatch, restore_env):
    log_every, steps = 3, 7  # logging steps 3, 6 and the last, 7
    position = {"after_step": 0}  # the syncs seen after optimizer step N (0: set-up, then step 1)
    seen: Counter = Counter()
    real_maybe_fail = faults.maybe_fail

    def step_marker(point: str, step: int) -> None:
        if point == "step":
            position["after_step"] = step
        real_maybe_fail(point, step)

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            owner = _owner(sys._getframe(1))
            if owner is not None:
                seen[(position["after_step"], owner[0], owner[1], name)] += 1
            return real(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(faults, "maybe_fail", step_marker)
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    overrides = [
        *prepared_data.overrides,
        *TINY_RUN,
        f"train.max_steps={steps}",
        f"logging.every_steps={log_every}",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "train.val_every=0",
        f"run.dir={tmp_path / 'run'}",
    ]
    assert train(overrides) == 0
    monkeypatch.undo()

    ours = {k: n for k, n in seen.items() if k[1] == "llmtrain" and k[0] >= 1}
    logging_steps = {s for s in range(1, steps + 1) if s % log_every == 0 or s == steps}
    between = {k: n for k, n in ours.items() if k[0] not in logging_steps}
    assert not between, f"host syncs from llmtrain after non-logging steps: {between}"
    assert {k[0] for k in ours} == logging_steps  # the counter sees the logging steps' own reads
    inside = Counter()
    for (after, who, where, name), n in seen.items():
        if who == "deepspeed" and after >= 1:
            inside[f"{where} .{name}()"] += n
    per_step = {k: round(n / (steps - 1), 2) for k, n in inside.items()}
    print(f"\nDeepSpeed's own host syncs per step (ZeRO-1, fp32, CPU): {per_step}")
