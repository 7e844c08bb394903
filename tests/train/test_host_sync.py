"""No host synchronisation from llmtrain's own code between logging steps.

On a GPU every `.item()`, `.tolist()`, `bool(tensor)`, `float(tensor)` or copy to the host waits for
the device to finish all queued work; one per step is enough to idle the GPU between steps. On CPU
they cost nothing, so timing cannot show them: this test counts them instead. It wraps those
tensor methods and DeepSpeed's `get_accelerator().synchronize()` (a device-wide wait on a GPU, a
no-op here but still called), runs a real training loop in this process and attributes each call to
the first frame outside torch. llmtrain's calls may only come after a logging step (the one agreed
all-reduce of the interval). Where clipping and the skip run on the device nobody may make one
between logging steps; where DeepSpeed decides, its own are counted and shown (docs/performance.md).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from trainer_runs import TINY_RUN, train

from llmtrain import faults

ROOT = Path(__file__).resolve().parents[2]
OURS = (str(ROOT / "llmtrain"), str(ROOT / "kernels"))  # kernels/ is installed as llmtrain.kernels
# Reads that only the CPU makes, where a sync costs nothing: on a GPU the same check is an on-device
# assert (kernels/chunked_ce.py: `torch._assert_async` on a target out of range).
CPU_ONLY = {"check_inputs"}
TORCH = str(Path(torch.__file__).parent)
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")


def _owner(frame) -> tuple[str, str] | None:
    """(who, where) of the first caller outside torch: who is llmtrain, deepspeed or other."""
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    if frame is None:
        return None
    path = frame.f_code.co_filename
    if frame.f_code.co_name in CPU_ONLY and path.startswith(OURS):
        return None
    who = "llmtrain" if path.startswith(OURS) else "deepspeed" if "/deepspeed/" in path else "other"
    return who, f"{Path(path).name}:{frame.f_lineno} {frame.f_code.co_name}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_llmtrain_host_sync_between_logging_steps(
    prepared_data, tmp_path, monkeypatch, restore_env, precision
):
    """Where DeepSpeed decides clip and skip (train.step_on_device=false): its own reads are counted."""
    setting = ["deepspeed=zero1", f"train.precision={precision}", "train.step_on_device=false"]
    seen = _count_syncs(prepared_data, tmp_path, monkeypatch, setting)
    inside = Counter()
    for (after, who, where, name), n in seen.items():
        if who == "deepspeed" and after >= 1:
            inside[f"{where} .{name}()"] += n
    per_step = {k: round(n / (STEPS - 1), 2) for k, n in inside.items()}
    print(f"\nDeepSpeed's own host syncs per step (ZeRO-1, {precision}, CPU, DeepSpeed decides): {per_step}")
    assert inside, "DeepSpeed's own checks were expected to read the norm on the host"


@pytest.mark.parametrize(
    "setting",
    [
        pytest.param(["deepspeed=zero0", "train.precision=fp32"], id="zero0-fp32"),
        pytest.param(["deepspeed=zero1", "train.precision=bf16"], id="zero1-bf16"),
        pytest.param(["deepspeed=zero2", "train.precision=bf16"], id="zero2-bf16", marks=pytest.mark.slow),
    ],
)
def test_a_step_decided_on_the_device_makes_no_host_sync_at_all(
    prepared_data, tmp_path, monkeypatch, restore_env, capsys, setting
):
    """Clipping and the non-finite skip inside the fused AdamW: between logging steps nobody reads the
    device, not llmtrain, not DeepSpeed (train.step_on_device, llmtrain.distributed.device_step)."""
    seen = _count_syncs(prepared_data, tmp_path, monkeypatch, [*setting, "train.grad_clip=0.5"])
    assert "clipping and non-finite skips: on the device" in capsys.readouterr().err
    logging_steps = {s for s in range(1, STEPS + 1) if s % LOG_EVERY == 0 or s == STEPS}
    between = {k: n for k, n in seen.items() if k[0] >= 1 and k[0] not in logging_steps}
    assert not between, f"host syncs after non-logging steps: {between}"


LOG_EVERY, STEPS = 3, 7  # logging steps 3, 6 and the last, 7


def _count_syncs(prepared_data, tmp_path, monkeypatch, setting: list[str]) -> Counter:
    """Train STEPS steps in this process; {(after optimizer step N, who, where, call): count}."""
    log_every, steps = LOG_EVERY, STEPS
    position = {"after_step": 0}  # the syncs seen after optimizer step N (0: set-up, then step 1)
    seen: Counter = Counter()
    real_maybe_fail = faults.maybe_fail

    def step_marker(point: str, step: int) -> bool:
        if point == "step":
            position["after_step"] = step
        return real_maybe_fail(point, step)

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
    # DeepSpeed's own device-wide waits (a no-op on a CPU, still called where a GPU would wait)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    real_synchronize = accelerator.synchronize

    def counting_synchronize(*args, **kwargs):
        owner = _owner(sys._getframe(1))
        if owner is not None:
            seen[(position["after_step"], owner[0], owner[1], "accelerator.synchronize")] += 1
        return real_synchronize(*args, **kwargs)

    monkeypatch.setattr(accelerator, "synchronize", counting_synchronize)
    overrides = [
        *prepared_data.overrides,
        *TINY_RUN,
        *setting,
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
    return seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="watches a GPU's synchronisations")
def test_a_gpu_step_makes_no_synchronizing_call(prepared_data, tmp_path, restore_env):
    """On a GPU, torch itself watches: train.sync_debug=error fails the run at the first synchronising
    call between logging steps (loader, model, loss, DeepSpeed's step), with its stack."""
    overrides = [
        *prepared_data.overrides,
        *TINY_RUN,
        "deepspeed=zero1",
        "train.precision=bf16",
        "train.sync_debug=error",
        f"train.max_steps={STEPS}",
        f"logging.every_steps={LOG_EVERY}",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "train.val_every=0",
        f"run.dir={tmp_path / 'run'}",
    ]
    assert train(overrides) == 0
