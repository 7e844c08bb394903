"""The training backend: the one object that drives DeepSpeed.

Everything that touches DeepSpeed's engine, optimizer wrappers or checkpoint files goes through
here: building the engine, forward / backward / step, the gradient norm, the learning rate, saving
and loading a checkpoint's shards, the universal conversion between world sizes, and consolidating
the weights of any ZeRO stage for eval and export. The trainer, the checkpoint manager and
inference see only this interface (`TrainingBackend`), so a second backend (torch FSDP2) can be
added beside it without touching them. No module outside `llmtrain.distributed` imports deepspeed.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

from llmtrain.config import Config
from llmtrain.distributed.device_step import DeviceStep, module_grad_norm
from llmtrain.distributed.ds_config import build_ds_config, can_step_on_device, offloads_optimizer
from llmtrain.errors import CheckpointError, ConfigError
from llmtrain.train.optim import adamw, lr_scales


class TrainingBackend(Protocol):
    """What the trainer, the checkpoint manager and validation need from a parallelism backend."""

    device: torch.device
    training: bool
    steps_on_device: bool

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None): ...
    def train(self, mode: bool = True) -> None: ...
    def eval(self) -> None: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, *, measure_grad_norm: bool = False) -> None: ...
    @property
    def last_skip(self) -> float | torch.Tensor: ...
    def grad_norm(self) -> float | None: ...
    def set_lr(self, lr: float) -> None: ...
    def save(self, folder: Path, client_state: dict[str, Any]) -> None: ...
    def load(self, folder: Path) -> None: ...


class DeepSpeedBackend:
    """A model wrapped in a DeepSpeed engine with our optimizer (torch AdamW, or DeepSpeed's CPU
    Adam when ZeRO-Offload keeps the optimizer state on the host)."""

    def __init__(
        self,
        model: torch.nn.Module,
        param_groups: list[dict],
        cfg: Config,
        world_size: int,
        device: torch.device,
        *,
        load_universal: bool = False,
    ):
        import deepspeed

        self.device = device
        self.cfg = cfg
        self.ds_config = build_ds_config(cfg, world_size, load_universal=load_universal)
        _check_precision(self.ds_config)
        # Each group's own settings, restored after a load (see _repair_after_load), and its lr as a
        # multiple of optim.lr (Muon's groups run at optim.muon_lr), applied by set_lr.
        o = cfg.optim
        self._group_settings = [
            {**({} if g.get("use_muon") else {"betas": (o.beta1, o.beta2), "eps": o.eps}), **g}
            for g in param_groups
        ]
        for settings in self._group_settings:
            del settings["params"]
            settings.pop("lr", None)
        self._lr_scales = lr_scales(param_groups, cfg.optim)
        optimizer = _build_optimizer(param_groups, cfg, self.ds_config)
        on_device = can_step_on_device(cfg, self.ds_config) and bool(optimizer.defaults.get("fused"))
        if on_device:
            self.ds_config = build_ds_config(
                cfg, world_size, load_universal=load_universal, steps_on_device=True
            )
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.module = model
        if cfg.model.compile:
            # DeepSpeed's route: the whole module, compiled after its ZeRO hooks are installed.
            from deepspeed.accelerator import get_accelerator

            self.engine.compile(backend=get_accelerator().get_compile_backend())
        # Under ZeRO and in its fp16 / bf16 optimizer wrappers DeepSpeed records the unscaled global
        # norm and skips a non-finite step itself; fp32 ZeRO-0 steps our torch AdamW directly and does
        # neither.
        e = self.engine
        self._deepspeed_wraps_optimizer = e.zero_optimization() or e.fp16_enabled() or e.bfloat16_enabled()
        self._own_grad_norm: float | None = None
        self._skip_update = False
        self._last_skip: float | torch.Tensor = 0.0
        self._device_step: DeviceStep | None = None
        if on_device:
            self._device_step = DeviceStep(optimizer, cfg.train.grad_clip, self._global_norm_source())
        elif not self._deepspeed_wraps_optimizer:
            self._make_updates_skippable()

    # -- the step ------------------------------------------------------------------------------

    def __call__(self, inputs, targets, doc_ids=None):
        return self.engine(inputs, targets, doc_ids)

    @property
    def training(self) -> bool:
        return self.engine.training

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    @property
    def steps_on_device(self) -> bool:
        """Clipping and the non-finite skip run inside the fused AdamW (llmtrain.distributed.device_step)."""
        return self._device_step is not None

    def _grads_finite(self) -> torch.Tensor:
        """A 0-dim bool tensor on the device: every gradient held by the module is finite (no sync).

        Meaningful where the module holds whole gradients (ZeRO-0); ZeRO 1-3 partition them and
        DeepSpeed checks them itself.
        """
        flags = [torch.isfinite(p.grad).all() for p in self.module.parameters() if p.grad is not None]
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=self.device)

    def step(self, *, measure_grad_norm: bool = False) -> None:
        """DeepSpeed's step (it updates only at the accumulation boundary), skipping a non-finite update.

        Who decides the skip: our fused AdamW on the device (`steps_on_device`); else DeepSpeed's
        wrappers, on the host; else (fp32 ZeRO-0 with Muon, where DeepSpeed checks nothing) this method,
        from the module's gradients, with one host read. `measure_grad_norm` records the norm on that
        last path, where nobody else does.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return
        skipped_before = self.engine.skipped_steps
        if self._device_step is not None:
            self._device_step.begin()
        elif not self._deepspeed_wraps_optimizer:
            if measure_grad_norm:
                self._own_grad_norm = float(module_grad_norm(self.module, self.device))
            self._skip_update = not bool(self._grads_finite())
        try:
            self.engine.step()
        finally:
            skip, self._skip_update = self._skip_update, False
        if self._device_step is not None and self._device_step.armed:
            self._last_skip = self._device_step.found_inf
        else:  # decided on the host, by DeepSpeed or above
            self._last_skip = float(skip or self.engine.skipped_steps > skipped_before)

    @property
    def last_skip(self) -> float | torch.Tensor:
        """Whether the last optimizer step dropped its update as non-finite: 1.0 or 0.0 where that was
        decided on the host, a 0-dim float tensor on the device where it was decided there (reading it
        waits for the step: read it where the loop reads the loss)."""
        return self._last_skip

    def _global_norm_source(self):
        """Where DeviceStep reads this step's global gradient norm when the optimizer is about to step."""
        if not self._deepspeed_wraps_optimizer:  # fp32 ZeRO-0: whole gradients, averaged over ranks
            return lambda: module_grad_norm(self.module, self.device)
        zero = self.engine.optimizer
        if not hasattr(zero, "_global_grad_norm"):
            raise RuntimeError(
                f"{type(zero).__name__} records no _global_grad_norm; use train.step_on_device=false"
            )
        # ZeRO 1/2 set it (all-reduced, unscaled) before they step the optimizer; the engine copies it
        # only afterwards, so get_global_grad_norm() would give the previous step's.
        return lambda: zero._global_grad_norm

    def _make_updates_skippable(self) -> None:
        """Where DeepSpeed steps our torch optimizer directly (fp32 ZeRO-0), let `step(skip=True)` make
        that one update a no-op: parameters and Adam moments untouched, DeepSpeed's counters and
        gradient zeroing as after any step."""
        optimizer = self.engine.optimizer
        update = optimizer.step

        def step(*args, **kwargs):
            return None if self._skip_update else update(*args, **kwargs)

        optimizer.step = step

    def grad_norm(self) -> float | None:
        """The last step's global gradient norm (a host read: call it at logging steps only)."""
        if self._device_step is not None and self._device_step.norm is not None:
            return float(self._device_step.norm)
        if not self._deepspeed_wraps_optimizer:
            return self._own_grad_norm
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def set_lr(self, lr: float) -> None:
        """Set every parameter group's learning rate from the schedule's lr(step) (the schedule is
        ours, not DeepSpeed's): lr itself, or for Muon's groups lr * optim.muon_lr / optim.lr."""
        for group, scale in zip(self.engine.optimizer.param_groups, self._lr_scales, strict=True):
            group["lr"] = lr * scale

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, folder: Path, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its DeepSpeed shards into `folder` (it must exist)."""
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY

        # ds_to_universal refuses a checkpoint without this key; plain data parallelism needs no patterns.
        state = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.4}, **client_state}
        # DeepSpeed's own `latest` is never written: it would name the folder before every rank finished.
        self.engine.save_checkpoint(
            str(folder.parent), tag=folder.name, client_state=state, save_latest=False
        )

    def load(self, folder: Path) -> None:
        """Collective: model, optimizer and step counters from `folder` (verified by the caller)."""
        load_path, _ = self.engine.load_checkpoint(
            str(folder.parent),
            tag=folder.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if load_path is None:
            raise CheckpointError(f"{folder}: DeepSpeed found nothing to load")
        self._repair_after_load()

    def _repair_after_load(self) -> None:
        """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19), harmless on every other path,
        and put back this run's gradient clip, which every ZeRO load overwrites with the saved one.

        It copies group 0's hyperparameters onto every group (the no-decay group would get weight
        decay, an AdamW group Muon's tag) and puts ONE `step` tensor into the state of every sub-group, so each optimizer step
        advances it once per group and Adam's bias correction drifts. Found by comparing a 2-rank ->
        1-rank resume with the uninterrupted run; with this repair they match bit for bit.
        """
        groups = self.engine.optimizer.param_groups
        if len(groups) != len(self._group_settings):
            raise RuntimeError(
                f"optimizer has {len(groups)} parameter groups, expected {len(self._group_settings)}"
            )
        for group, settings in zip(groups, self._group_settings):
            group.update(settings)  # weight decay, betas, eps; Muon's use_muon, momentum, ns_method
        if hasattr(self.engine.optimizer, "clip_grad"):
            # ZeRO's optimizer state carries the clip it was saved with and loading restores it; the
            # clip is this run's (0 where the fused AdamW clips on the device, or it would clip twice).
            self.engine.optimizer.clip_grad = float(self.ds_config["gradient_clipping"])
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


# ---------------------------------------------------------------- offline checkpoint work


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint saved with any ZeRO stage, on the CPU (verified by the caller)."""
    if any(folder.glob("*_optim_states.pt")):
        # DeepSpeed narrates on stdout (from its import on), where `llmtrain generate` writes samples.
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        # ZeRO-0 keeps the whole module in mp_rank_00 (in the training dtype).
        files = sorted(folder.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{folder}: no DeepSpeed model states found")
        state = _load_model_states(files[0])["module"]
    return {name: tensor.detach().float().contiguous() for name, tensor in state.items()}


def _load_model_states(path: Path) -> dict[str, Any]:
    """DeepSpeed's model-states file with `weights_only=True`; it also holds DeepSpeed's own config
    objects, which the safe unpickler knows once DeepSpeed's classes are allow-listed."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401  (registers the classes the file refers to)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (or a RuntimeError around it)
        raise CheckpointError(
            f"{path}: cannot be read safely ({type(err).__name__}: {_unpickling_reason(err)})"
        ) from None


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's multi-paragraph message that names what was refused (its first line only
    suggests retrying with weights_only=False, the one thing not to do with an unverified file)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(err).__name__])[0][:200]


def convert_to_universal(checkpoint: Path, out: Path, *, workers: int = 0) -> None:
    """DeepSpeed's `ds_to_universal` from `checkpoint` into the (new) folder `out`, with `workers`
    processes (0 = one per core), in a child process (llmtrain.distributed.ds_universal says why)."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "llmtrain.distributed.ds_universal",
        str(checkpoint),
        str(out),
        f"--workers={workers}",
    ]
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {result.returncode}"
        raise CheckpointError(f"{checkpoint}: universal conversion failed: {why}")


def build_partitioned_model(cfg: Config, world_size: int) -> torch.nn.Module:
    """ZeRO-3's model built with every parameter partitioned across the ranks as it is created
    (`deepspeed.zero.Init`): a rank holds 1/world of the weights, plus one module's at a time while
    our initialization writes them (`Transformer.reset_parameters(gathered=...)`, same draws in the
    same order as the eager build, so the same weights bit for bit)."""
    import deepspeed

    from llmtrain.model.transformer import Transformer

    with deepspeed.zero.Init(config_dict_or_path=build_ds_config(cfg, world_size)):
        model = Transformer(cfg.model, init_weights=False)
    model.reset_parameters(gathered=_gathered_for_writing)
    return model


def load_into_partitioned(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state)` for a zero.Init model, one parameter whole at a time."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under both names
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ConfigError(
            f"train.init_from: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            with _gathered_for_writing([param]):
                param.copy_(state[name])


def _gathered_for_writing(params: list[torch.nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


# ---------------------------------------------------------------- helpers


def _check_precision(ds_config: dict[str, Any]) -> None:
    """A clear error instead of DeepSpeed's traceback when the device lacks the chosen precision."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for key, supported in (("fp16", accelerator.is_fp16_supported), ("bf16", accelerator.is_bf16_supported)):
        if ds_config.get(key, {}).get("enabled") and not supported():
            raise ConfigError(
                f"train.precision={key}: not supported by this device ({accelerator.device_name()}); "
                "use train.precision=auto, bf16 or fp32"
            )


def _build_optimizer(
    param_groups: list[dict], cfg: Config, ds_config: dict[str, Any]
) -> torch.optim.Optimizer:
    """torch AdamW; DeepSpeed's CPU Adam (AdamW mode) when the optimizer state lives on the CPU.

    ZeRO-Offload refuses a client torch optimizer (`zero_force_ds_cpu_optimizer`), since stepping
    it on the host is several times slower than the vectorised CPU Adam.
    """
    o = cfg.optim
    if o.name == "muon":
        return _muon(param_groups)
    if not offloads_optimizer(ds_config):
        return adamw(param_groups, o, o.lr)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(
        param_groups,
        adamw_mode=True,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )


def _muon(param_groups: list[dict]) -> torch.optim.Optimizer:
    """DeepSpeed's MuonWithAuxAdam over groups tagged `use_muon` (llmtrain.train.optim), with torch's
    AdamW stepping the other half.

    Handed to deepspeed.initialize as an optimizer object, not as `"optimizer": {"type": "Muon"}`:
    DeepSpeed then tags every 2-D parameter whose name lacks "embed" / "lm_head" for Muon, which
    would put our token embedding (`tok_emb`) under Muon without a word. Its ZeRO 1/2/3 and bf16
    wrappers recognize the optimizer by its class and run the Newton-Schulz step on whole matrices
    (gathered across partitions); at ZeRO-0 it runs inside the optimizer's own step.
    """
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    fused = all(p.device.type in ("cpu", "cuda") for g in param_groups for p in g["params"])
    return MuonWithAuxAdam(
        param_groups,
        adam_optimizer=torch.optim.AdamW,
        adam_optimizer_kwargs={"fused": True} if fused else {"foreach": True},
        adam_w_mode=True,
    )
