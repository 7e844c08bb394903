"""`llmtrain train`: the pretraining loop, one process per data-parallel rank.

`train()` reads top to bottom: find the checkpoint to resume, build the model, the engine and the
loaders, restore, then step. Each step sets the learning rate from the pure schedule, runs the
micro-batches of gradient accumulation through DeepSpeed, and only at logging intervals talks to
the host (loss, agreed time / signal decisions), so the device is never stalled by bookkeeping.
"""

from __future__ import annotations

import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmtrain.config import Config, ConfigError, batch_layout
from llmtrain.distributed import engine as dist_engine
from llmtrain.errors import CheckpointError
from llmtrain.eval.evaluate import batch_to_device, evaluate
from llmtrain.train import checkpoint as ckpt


def main(cfg: Config) -> int:
    info = dist_engine.init_distributed()
    result = train(cfg, info)
    # Not in a `finally`: a rank that raised must exit now, so the launcher sees it and stops the
    # job, instead of waiting in shutdown's barrier for ranks blocked in a collective it never joins.
    if info.launched:
        dist_engine.shutdown()
    return result


@dataclass
class _Window:
    """What happened since the last log: summed on the device, read at the next log only."""

    loss_sum: torch.Tensor
    micro_batches: int = 0
    steps: int = 0
    data_wait: float = 0.0
    excluded: float = 0.0  # seconds spent in validation / checkpoints, not counted as step time
    start: float = field(default_factory=time.perf_counter)


class _StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves and exits at the next logging interval."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                return

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second signal: give up at once
            self.restore()
            signal.raise_signal(signum)
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _config_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _resume_plan(cfg: Config, world_size: int, tokenizer_hash: str) -> tuple[Path | None, dict | None, bool]:
    """(checkpoint, its state, load through the universal format?) for `cfg.resume`."""
    path = ckpt.find_checkpoint(cfg.run_dir, cfg.resume)
    if path is None:
        return None, None, False
    state = ckpt.read_state(path)
    if state.get("tokenizer_hash") != tokenizer_hash:
        raise CheckpointError(
            f"{path}: saved with tokenizer {state.get('tokenizer_hash')}, but {cfg.data_dir}/tokenizer.json "
            f"has {tokenizer_hash}; resume with the data folder the run was trained on"
        )
    if cfg.train.global_batch_size is None:
        # Keep the run's global batch, so a resume on another world size sees the same samples.
        cfg.train.global_batch_size = int(state["global_batch_size"])
    elif cfg.train.global_batch_size != state["global_batch_size"]:
        warnings.warn(
            f"train.global_batch_size changed from {state['global_batch_size']} to "
            f"{cfg.train.global_batch_size}: the sample sequence continues, the step size differs",
            stacklevel=2,
        )
    from llmtrain.train import universal

    return path, state, universal.needs_universal(state, world_size, cfg.deepspeed.zero_stage, path)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _engine_grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _engine_records_grad_norm(engine) -> bool:
    """DeepSpeed records the unscaled global norm under ZeRO and in its fp16 / bf16 optimizer
    wrappers; fp32 ZeRO-0 steps our torch AdamW directly and records none."""
    return engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled()


def _local_grad_norm(model: torch.nn.Module) -> float:
    """Norm of the gradients held in the module: whole and averaged over ranks under fp32 ZeRO-0."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def train(cfg: Config, info: dist_engine.DistInfo) -> int:
    import torch.distributed as dist

    from llmtrain.data.loader import build_train_loader, build_val_loader, read_tokenizer_sidecar
    from llmtrain.model import build_model
    from llmtrain.model.flops import flops_per_token, mfu, peak_flops
    from llmtrain.train.metrics import MetricsLogger
    from llmtrain.train.optim import param_groups
    from llmtrain.train.schedule import horizon, lr_at

    rank, world, device = info.rank, info.world_size, info.device
    run_dir = cfg.run_dir

    # -- what we resume from (decides the global batch and whether the engine loads universal)
    vocab_size, tokenizer_hash = read_tokenizer_sidecar(cfg.data_dir)
    if cfg.model.vocab_size not in (None, vocab_size):
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} differs from the tokenizer's {vocab_size} "
            f"({cfg.data_dir}/tokenizer.json); leave it unset"
        )
    cfg.model.vocab_size = vocab_size
    resume_from, state, universal = _resume_plan(cfg, world, tokenizer_hash)
    global_batch, accum = batch_layout(cfg, world)
    cfg.train.global_batch_size = global_batch
    max_steps = cfg.train.max_steps
    if cfg.schedule.total_steps is None:
        cfg.schedule.total_steps = horizon(cfg.schedule, max_steps)
    if universal:
        from llmtrain.train.universal import ensure_universal

        resume_from = ensure_universal(resume_from)

    train_loader = build_train_loader(cfg, rank, world)
    val_loader = build_val_loader(cfg, rank, world) if cfg.train.val_every > 0 else None
    if val_loader is not None and not any(map(val_loader.num_batches, val_loader.source_names)):
        # Same answer on every rank; found now, not as a crash at the first validation.
        raise ConfigError(
            f"train.val_every={cfg.train.val_every}: the validation split of {cfg.data_dir} has no full "
            f"batch of {cfg.train.micro_batch_size} x {world} rank(s) windows of {cfg.train.seq_len} "
            "tokens; set train.val_every=0, or prepare with a larger data.val_fraction"
        )

    # -- model and engine: the same initial weights on every rank, then per-rank randomness
    dist_engine.seed_everything(cfg.run.seed)
    model = build_model(cfg.model)
    groups = param_groups(model, cfg.optim)
    weight_decays = [g["weight_decay"] for g in groups]
    engine, _ = dist_engine.build_engine(model, groups, cfg, world, load_universal=universal)
    dist_engine.seed_everything(dist_engine.rank_seed(cfg.run.seed, rank))

    start_step = 0
    if resume_from is not None:
        ckpt.load(engine, resume_from, restore_rng=state["world_size"] == world)
        dist_engine.repair_after_load(engine, weight_decays, cfg)
        train_loader.load_state_dict(state["loader"])
        start_step = int(state["step"])
        if rank == 0:
            print(f"llmtrain train: resumed from {resume_from} at step {start_step}", file=sys.stderr)
            if start_step >= max_steps:
                print(
                    f"llmtrain train: train.max_steps={max_steps} already reached; nothing to do",
                    file=sys.stderr,
                )
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_atomic(run_dir / "config.yaml", _config_yaml(cfg))

    metrics = MetricsLogger(
        cfg,
        run_dir,
        rank,
        wandb_run_id=(state or {}).get("wandb_run_id"),
        start_step=start_step,
        total_steps=max_steps,
    )
    stop = _StopSignal()
    stop.install()
    flops_tok = flops_per_token(cfg.model, cfg.train.seq_len)
    peak = peak_flops() if device.type == "cuda" else None
    tokens_per_step = global_batch * cfg.train.seq_len

    def save(step: int) -> dict[str, float]:
        client = {
            "step": step,
            "loader": train_loader.state_dict(),
            "world_size": world,
            "zero_stage": cfg.deepspeed.zero_stage,
            "global_batch_size": global_batch,
            "tokenizer_hash": tokenizer_hash,
            "wandb_run_id": metrics.wandb_run_id,
            "seed": cfg.run.seed,
        }
        return ckpt.save(
            engine, run_dir, step, client, config_yaml=_config_yaml(cfg), keep_last=cfg.checkpoint.keep_last
        )

    engine.train()
    window = _Window(loss_sum=torch.zeros((), device=device))
    last_save = time.monotonic()
    saved_step = start_step
    step = start_step
    own_grad_norm = None
    measure_grad_norm = not _engine_records_grad_norm(engine)
    last_checkpoint: dict[str, float] = {}  # reported with the next training record
    try:
        while step < max_steps:
            # -- one optimizer step: lr from the schedule, then accumulate over micro-batches
            lr = lr_at(step, base_lr=cfg.optim.lr, schedule=cfg.schedule, max_steps=max_steps)
            dist_engine.set_lr(engine, lr)
            logging_step = (step + 1) % cfg.logging.every_steps == 0 or step + 1 == max_steps
            for micro in range(accum):
                t0 = time.perf_counter()
                batch = train_loader.next_batch()
                window.data_wait += time.perf_counter() - t0
                inputs, targets, doc_ids = batch_to_device(batch, device, cfg.model.doc_mask)
                loss = engine(inputs, targets, doc_ids)
                engine.backward(loss)
                if measure_grad_norm and logging_step and micro == accum - 1:
                    own_grad_norm = _local_grad_norm(model)
                engine.step()
                window.loss_sum += loss.detach().float()
                window.micro_batches += 1
            step += 1
            window.steps += 1

            # -- logging interval: the only per-step host sync, shared with the rank agreement
            save_now = step % cfg.checkpoint.every_steps == 0 if cfg.checkpoint.every_steps else False
            stop_now = False
            if step % cfg.logging.every_steps == 0 or step == max_steps:
                due = (
                    cfg.checkpoint.every_minutes is not None
                    and rank == 0
                    and time.monotonic() - last_save >= 60 * cfg.checkpoint.every_minutes
                )
                flags = torch.tensor(
                    [window.micro_batches, float(due), float(stop.received is not None)],
                    dtype=torch.float32,
                    device=device,
                )
                packed = torch.cat([window.loss_sum.reshape(1), flags])
                dist.all_reduce(packed)
                loss_sum, micro_batches, due_any, stop_any = packed.tolist()
                elapsed = time.perf_counter() - window.start - window.excluded
                tokens_per_s = window.steps * tokens_per_step / elapsed
                record = {
                    "loss": loss_sum / micro_batches,
                    "lr": lr,
                    "grad_norm": own_grad_norm if measure_grad_norm else _engine_grad_norm(engine),
                    "tokens_per_s": tokens_per_s,
                    "tokens_per_s_per_device": tokens_per_s / world,
                    "step_time_s": elapsed / window.steps,
                    "data_wait_share": window.data_wait / elapsed,
                    "memory_gb": _memory_gb(device),
                    "tokens": step * tokens_per_step,
                }
                util = mfu(tokens_per_s / world, flops_tok, peak)
                if util is not None:
                    record["mfu"] = util
                record.update(last_checkpoint)
                last_checkpoint = {}
                metrics.log(step, record)
                save_now = save_now or due_any > 0
                stop_now = stop_any > 0
                window = _Window(loss_sum=torch.zeros((), device=device))

            t0 = time.perf_counter()
            if val_loader is not None and (step % cfg.train.val_every == 0 or step == max_steps):
                metrics.log_val(step, evaluate(engine, val_loader, device, doc_mask=cfg.model.doc_mask))
            if save_now or stop_now or (step == max_steps and cfg.checkpoint.at_end):
                saved = save(step)
                last_checkpoint = {"checkpoint_s": saved["ckpt_s"], "checkpoint_gb": saved["ckpt_gb"]}
                metrics.write(
                    f"llmtrain train: saved {ckpt.step_dir(run_dir, step)} ({saved['ckpt_gb']:.3f} GB "
                    f"in {saved['ckpt_s']:.2f} s)"
                )
                saved_step, last_save = step, time.monotonic()
            window.excluded += time.perf_counter() - t0
            if stop_now:
                if rank == 0:  # stderr, so a scheduler's error log shows why the run ended
                    reason = stop.received or "signal"
                    print(f"llmtrain train: {reason}: saved step {saved_step}, exiting", file=sys.stderr)
                return 0
    finally:
        stop.restore()
        metrics.close()
    return 0
