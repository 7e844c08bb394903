"""The non-finite guard and loss-spike detector: every rank takes the same action, and the run never
"finishes" having skipped every step.

Where the decision comes from, so no host sync is added on a GPU loop:
- A non-finite gradient is caught before the update, from the global gradient norm, which every rank
  shares. Where the fused AdamW decides (train.step_on_device: fp32 ZeRO-0 and bf16 ZeRO 1/2, see
  llmtrain.distributed.device_step) the update is dropped on the device and the trainer hands the
  guard each step's flag at the next logging or checkpoint step, in order (`on_step` for each), so
  the guard acts there. Elsewhere DeepSpeed checks on the host every step (fp16, ZeRO-3) or the
  backend does (fp32 ZeRO-0 with Muon), and the guard hears of each step at once.
- A non-finite or spiking *logged* loss is seen at the logging interval, where the loss is read
  (summed over ranks) anyway.

Actions (`guard.nonfinite`): `skip` drops the update and goes on; `rollback` reloads the last good
checkpoint and skips the next `guard.skip_batches` global batches; `stop` exits non-zero and saves
nothing new. `guard.max_consecutive_skips` skipped steps in a row stop the run. A spike cannot be
"skipped" (its updates were applied), so under `skip` it is counted and reported, and under
`rollback` / `stop` it triggers that action.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from llmtrain.errors import UserError
from llmtrain.train.config import GuardConfig


class GuardStop(UserError):
    """Training cannot continue safely; the message says at which step and what was non-finite."""


@dataclass
class Verdict:
    action: str
    """"ok" | "rollback" | "stop"."""
    reason: str = ""


class Guard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.skipped_total = 0
        self.consecutive = 0
        self.spikes = 0
        self.rollbacks = 0
        self._window: deque[float] = deque(maxlen=cfg.spike_window)

    # -- per step --------------------------------------------------------------------------------

    def on_step(self, step: int, *, skipped: bool, cause: str = "gradient norm") -> Verdict:
        """After optimizer step `step` (1-based): whether its update was skipped as non-finite."""
        if not skipped:
            self.consecutive = 0
            return Verdict("ok")
        self.skipped_total += 1
        self.consecutive += 1
        reason = f"step {step}: non-finite {cause}, update skipped"
        if self.consecutive >= self.cfg.max_consecutive_skips:
            return Verdict(
                "stop",
                f"step {step}: {self.consecutive} consecutive steps with a non-finite {cause} "
                f"(guard.max_consecutive_skips={self.cfg.max_consecutive_skips}); lower optim.lr or check the data",
            )
        if self.cfg.nonfinite == "skip":
            return Verdict("ok", reason)
        return Verdict(self.cfg.nonfinite, reason)

    # -- per logging interval ----------------------------------------------------------------------

    def on_log(self, step: int, loss: float) -> Verdict:
        """The interval's mean loss over the updates that were applied."""
        if not math.isfinite(loss):
            # Applied updates produced a non-finite loss: the weights themselves are suspect.
            action = "rollback" if self.cfg.nonfinite == "rollback" else "stop"
            return Verdict(action, f"step {step}: non-finite loss ({loss}) after applied updates")
        sigma = self.cfg.spike_sigma
        verdict = Verdict("ok")
        if sigma is not None and len(self._window) >= max(2, self._window.maxlen // 2):
            mean = sum(self._window) / len(self._window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self._window) / (len(self._window) - 1))
            if std > 0 and (loss - mean) / std > sigma:
                self.spikes += 1
                reason = (
                    f"step {step}: loss spike {loss:.4f}, {(loss - mean) / std:.1f} sigma above the "
                    f"running mean {mean:.4f} (guard.spike_sigma={sigma})"
                )
                action = self.cfg.nonfinite if self.cfg.nonfinite != "skip" else "ok"
                verdict = Verdict(action, reason)
                if action != "ok":
                    return verdict  # a spike does not enter the window it is judged against
        self._window.append(loss)
        return verdict

    def metrics(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_total, "loss_spikes": self.spikes, "rollbacks": self.rollbacks}

    # -- checkpointed state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_total": self.skipped_total,
            "consecutive": self.consecutive,
            "spikes": self.spikes,
            "rollbacks": self.rollbacks,
            "window": list(self._window),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_total = int(state.get("skipped_total", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.spikes = int(state.get("spikes", 0))
        self.rollbacks = int(state.get("rollbacks", self.rollbacks))
        self._window.clear()
        self._window.extend(float(x) for x in state.get("window", []))
