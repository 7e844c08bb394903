"""Gradient clipping and the non-finite skip decided on the device, so a step waits on no host read.

DeepSpeed 0.19.8 makes both decisions on the host: its ZeRO 1/2 step reads the global gradient norm
back (`bool(tensor)` in `is_invalid_grad_norm`) once to skip a non-finite step and once per
parameter group to clip, and on a GPU each read waits for every queued kernel. Where our optimizer
is torch's fused AdamW, both decisions move into its kernel instead. The fused kernel takes
`grad_scale` (it divides every gradient by it) and `found_inf` (non-zero: parameters, moments and the
step count stay as they were) as device tensors, the interface torch's GradScaler uses. DeepSpeed is
then told to clip and check nothing (`gradient_clipping=0`, `bf16.check_grad_overflow=false`, see
`llmtrain.distributed.ds_config`), and a step pre-hook sets both from the step's global norm:

    grad_scale = max(1, (norm + 1e-6) / clip)     DeepSpeed's own clip factor
    found_inf  = the norm is not finite

The norm is the one DeepSpeed computed and all-reduced for this step (ZeRO 1/2 record it before they
step the optimizer, one partition group at a time), or at ZeRO-0, where the module holds whole
gradients already averaged over the ranks, the norm of those. Every rank sees the same norm, so every
rank skips the same steps. The flag stays on the device until the trainer reads it at a logging or
checkpoint step, where it reads the loss anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# DeepSpeed's epsilon in its clip factor (stage_1_and_2.unscale_and_clip_grads), kept so that a clipped
# update is the one DeepSpeed would have made, within fp32 rounding (it multiplies by the reciprocal,
# the fused kernel divides).
_CLIP_EPS = 1e-6


class DeviceStep:
    """Arms `optimizer` (torch's fused AdamW) before each of its updates with this step's clip factor
    and skip flag, computed on the device from `global_norm()`."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, clip: float, global_norm: Callable[[], torch.Tensor]
    ):
        if not optimizer.defaults.get("fused"):
            raise ValueError("DeviceStep needs a fused torch optimizer (it reads grad_scale and found_inf)")
        self.optimizer = optimizer
        self.clip = float(clip)
        self._global_norm = global_norm
        self._step = 0  # optimizer steps begun
        self._armed_for = -1  # the step whose factor and flag the optimizer holds
        self.norm: torch.Tensor | None = None
        """The last armed step's global gradient norm (unclipped; inf or nan when non-finite)."""
        self.found_inf: torch.Tensor | None = None
        """The last armed step's skip flag: a 0-dim float32 tensor, 1.0 when its update was dropped."""
        optimizer.register_step_pre_hook(self._arm)

    def begin(self) -> None:
        """A new optimizer step starts: the next update of the optimizer arms it afresh."""
        self._step += 1

    @property
    def armed(self) -> bool:
        """Whether the optimizer was stepped (and so armed) since `begin()`."""
        return self._armed_for == self._step

    def _arm(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        # ZeRO 1/2 step the optimizer once per parameter group, with the same global norm each time.
        if self.armed:
            return
        norm = self._global_norm().detach().float().reshape(())
        self.norm = norm
        self.found_inf = (~torch.isfinite(norm)).float()
        optimizer.found_inf = self.found_inf
        if self.clip > 0:
            optimizer.grad_scale = torch.clamp((norm + _CLIP_EPS) / self.clip, min=1.0)
        self._armed_for = self._step


def module_grad_norm(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The 2-norm of every gradient the module holds, as a 0-dim fp32 tensor on `device` (no host read)."""
    norms = [
        torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        for p in module.parameters()
        if p.grad is not None
    ]
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.linalg.vector_norm(torch.stack(norms))
