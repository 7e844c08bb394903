"""`llmtrain train`: the pretraining loop, one process per data-parallel rank.

`Trainer.__init__` sets the run up, top to bottom: the tokenizer's identity, the shard check (in the
background), the checkpoint to resume and the run's fixed terms, the loaders, the model and the
training backend, then the restore. `Trainer.fit` steps: the learning rate from the pure schedule,
the micro-batches of gradient accumulation through the backend, and only at logging intervals a
talk with the host (loss, agreed time / signal decisions), so the device is not stalled by
bookkeeping. Every stateful part (loader, guard, metrics, RNG, run terms) goes through the
checkpoint manager as a `state_dict()`.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmtrain import faults
from llmtrain.config import Config, batch_layout
from llmtrain.data.batch import batch_to_device
from llmtrain.distributed import runtime
from llmtrain.errors import CheckpointError, ConfigError, JobError
from llmtrain.eval.evaluate import evaluate
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.guard import Guard, GuardStop, Verdict


def main(cfg: Config) -> int:
    info = runtime.init_distributed(timeout_s=cfg.train.collective_timeout_s)
    result = Trainer(cfg, info).fit()
    # Not in a `finally`: a rank that raised must exit now, so the launcher sees it and stops the
    # job, instead of waiting in shutdown's barrier for ranks blocked in a collective it never joins.
    if info.launched:
        runtime.shutdown()
    return result


@dataclass
class _Window:
    """What happened since the last log: summed on the device, read at the next log only."""

    loss_sum: torch.Tensor
    micro_batches: torch.Tensor  # of the applied updates
    steps: int = 0
    data_wait: float = 0.0
    excluded: float = 0.0  # seconds spent in validation / checkpoints, not counted as step time
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def empty(cls, device: torch.device) -> _Window:
        return cls(loss_sum=torch.zeros((), device=device), micro_batches=torch.zeros((), device=device))

    def add(self, step_loss: torch.Tensor, micro_batches: int, skipped: float | torch.Tensor) -> None:
        """Count a step's summed loss unless its update was skipped (a host or a device flag)."""
        if torch.is_tensor(skipped):
            applied = skipped == 0
            self.loss_sum += torch.where(applied, step_loss, 0.0)  # a skipped step's loss may be nan
            self.micro_batches += applied.float() * micro_batches
        elif not skipped:
            self.loss_sum += step_loss
            self.micro_batches += micro_batches


def _config_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _memory_record(device: torch.device) -> dict[str, float]:
    """Peak memory under a name that says what it measured."""
    if device.type == "cuda":
        return {"memory_gb_cuda_peak": torch.cuda.max_memory_allocated(device) / 1e9}
    return {"memory_gb_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}  # KiB on Linux


class Trainer:
    def __init__(self, cfg: Config, info: runtime.DistInfo):
        self.cfg, self.info = cfg, info
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        self.run_dir = cfg.run_dir
        self.phase = "starting"  # named in the error when a collective fails
        self._choose_precision()
        identity = self._check_tokenizer()
        verification = self._start_shard_check(identity)
        resume_from, saved, universal = self._plan_resume(identity)
        self._build_loaders(identity)
        self.downstream = self._build_downstream_eval()
        self._build_model(resume_from, load_universal=universal)
        self.phase = "verifying the shards"
        from llmtrain.data.verify import agree

        agree(verification.wait())  # joined only now: it overlapped the model build
        self._restore(resume_from, saved)

    # -- setup, in order ------------------------------------------------------------------------

    def _choose_precision(self) -> None:
        """`train.precision=auto` becomes what the device runs fastest (before anything reads it)."""
        cfg = self.cfg
        precision, why = runtime.resolve_precision(cfg.train.precision)
        cfg.train.precision = precision  # config.yaml and the MFU show what ran
        self.precision_note = f"precision {precision} ({why})"  # said when training starts
        if precision == "bf16" and self.device.type == "cpu" and not runtime.cpu_has_native_bf16():
            self.precision_note += (
                "; WARNING: bf16 on a CPU without native bf16: matmuls run ~35x slower than fp32 "
                "(train.precision=auto picks fp32 here)"
            )

    def _check_tokenizer(self):
        """The identity (vocab size, hash) of data.dir's tokenizer, read once for the whole start."""
        from llmtrain.data.tokenizer import Tokenizer, tokenizer_identity

        cfg = self.cfg
        identity = tokenizer_identity(cfg.data_dir)
        if cfg.model.vocab_size not in (None, identity.vocab_size):
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} differs from the tokenizer's {identity.vocab_size} "
                f"({cfg.data_dir}/tokenizer.json); leave it unset"
            )
        cfg.model.vocab_size = identity.vocab_size
        # Training reads data.dir's tokenizer; a different one named here would be silently ignored.
        if cfg.tokenizer.path and Tokenizer.load(cfg.tokenizer.path).hash != identity.hash:
            raise ConfigError(
                f"tokenizer.path={cfg.tokenizer.path}: not the tokenizer of {cfg.data_dir} that the shards "
                "were made with; drop it, or `llmtrain prepare` with it into another data.dir"
            )
        return identity

    def _start_shard_check(self, identity):
        from llmtrain.data.verify import shards_to_verify, start_verification

        return start_verification(
            shards_to_verify(self.cfg.data_dir, [s.name for s in self.cfg.data.sources]),
            mode=self.cfg.data.verify,
            rank=self.rank,
            world_size=self.world,
            vocab_size=identity.vocab_size,
            tokenizer_hash=identity.hash,
        )

    def _plan_resume(self, identity) -> tuple[Path | None, dict | None, bool]:
        """The verified checkpoint to resume (or None), its state, whether it loads through the
        universal format; sets the run terms in force."""
        from llmtrain.data.verify import data_fingerprint
        from llmtrain.train import universal as uni
        from llmtrain.train.run_terms import resolve_run_terms

        cfg = self.cfg
        self.phase = "verifying the checkpoint to resume"
        resume_from = self._find_resume()
        saved = ckpt.read_state(resume_from) if resume_from is not None else None
        self.terms, notes = resolve_run_terms(
            cfg,
            tokenizer_hash=identity.hash,
            vocab_size=identity.vocab_size,
            data=data_fingerprint(cfg.data_dir, [s.name for s in cfg.data.sources]),
            world_size=self.world,
            saved=saved,
            checkpoint=resume_from,
        )
        for note in notes:
            self._say(f"note: {note}")
        self.global_batch, self.accum = batch_layout(cfg, self.world)
        universal = False
        if resume_from is not None:
            universal = uni.needs_universal(saved, self.world, cfg.deepspeed.zero_stage, resume_from)
            if universal and cfg.optim.name == "muon":
                raise ConfigError(
                    f"resume={resume_from}: an optim=muon checkpoint resumes on the world size and ZeRO stage "
                    "it was saved with only: DeepSpeed's universal format (0.19) carries AdamW's moments, not "
                    "Muon's momentum; use those, or start a new run from its weights with train.init_from"
                )
            if universal:
                self.phase = "converting the checkpoint to the universal format"
                resume_from = uni.ensure_universal(
                    resume_from,
                    workers=cfg.checkpoint.convert_workers,
                    timeout_s=cfg.checkpoint.convert_timeout_s,
                )
        return resume_from, saved, universal

    def _build_loaders(self, identity) -> None:
        from llmtrain.data.loader import build_train_loader, build_val_loader

        cfg = self.cfg
        self.train_loader = build_train_loader(cfg, self.rank, self.world, identity)
        if cfg.data.prefetch:
            from llmtrain.data.prefetch import Prefetcher

            pin = self.device.type == "cuda"
            self.train_loader = Prefetcher(self.train_loader, depth=cfg.data.prefetch, pin_memory=pin)
        self.val_loader = None
        if cfg.train.val_every > 0:
            self.val_loader = build_val_loader(cfg, self.rank, self.world, identity)
            if not any(map(self.val_loader.num_batches, self.val_loader.source_names)):
                # Same answer on every rank; found now, not as a crash at the first validation.
                raise ConfigError(
                    f"train.val_every={cfg.train.val_every}: the validation split of {cfg.data_dir} has no "
                    f"full batch of {cfg.train.micro_batch_size} x {self.world} rank(s) windows of "
                    f"{cfg.train.seq_len} tokens; set train.val_every=0, or prepare with a larger data.val_fraction"
                )

    def _build_downstream_eval(self):
        """`train.eval_tasks` resolved now, so a bad task name stops the run before its first step."""
        if not self.cfg.train.eval_tasks:
            return None
        from llmtrain.data.tokenizer import load_tokenizer
        from llmtrain.eval.inloop import InLoopEval

        return InLoopEval(self.cfg, load_tokenizer(self.cfg.data_dir), self.device)

    def _build_model(self, resume_from: Path | None, *, load_universal: bool) -> None:
        """The same initial weights on every rank (or `train.init_from`'s), then per-rank randomness."""
        from llmtrain.distributed.backend import DeepSpeedBackend
        from llmtrain.model import build_model
        from llmtrain.train.optim import param_groups

        cfg = self.cfg
        self.phase = "building the model"
        runtime.seed_everything(cfg.run.seed)
        partitioned = cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.partitioned_init
        if partitioned:
            from llmtrain.distributed.backend import build_partitioned_model

            model = build_partitioned_model(cfg, self.world)
        else:  # compiled later, by the backend, through DeepSpeed
            model = build_model(dataclasses.replace(cfg.model, compile=False))
        if cfg.train.init_from and resume_from is None:
            from llmtrain.distributed.backend import load_into_partitioned

            weights, source = self._init_weights()
            if partitioned:
                load_into_partitioned(model, weights)
            else:
                missing, unexpected = model.load_state_dict(weights, strict=False)
                if missing or unexpected:
                    raise CheckpointError(
                        f"train.init_from={source}: weights do not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})"
                    )
            self._say(f"initialized the weights from {source}")
        self.backend = DeepSpeedBackend(
            model, param_groups(model, cfg.optim), cfg, self.world, self.device, load_universal=load_universal
        )
        if cfg.train.init_from and cfg.train.init_optimizer and resume_from is None:
            self._init_optimizer(source)
        runtime.seed_everything(runtime.rank_seed(cfg.run.seed, self.rank))

    def _init_optimizer(self, source: Path) -> None:
        """`train.init_optimizer`: the optimizer state (Adam moments, Muon momentum, step counts) of the
        `init_from` checkpoint (checked to fit by `_check_init_optimizer`), loaded through DeepSpeed;
        this run's own hyperparameters, schedule, loader and step counter."""
        self.phase = f"loading the optimizer state of {source} (train.init_optimizer)"
        self.backend.load(source)  # verified in _init_weights, on every rank
        self._say(f"initialized the optimizer state from {source}")

    def _check_init_optimizer(self, source: Path, theirs: Config | None) -> None:
        """DeepSpeed's optimizer shards load into the layout they were saved from only: the same world
        size, ZeRO stage and optimizer. Checked before any weight is read."""
        key = f"train.init_optimizer (train.init_from={source})"
        if theirs is None:
            raise ConfigError(f"{key}: a Hugging Face folder has no optimizer state; leave it false")
        saved_world = int(ckpt.read_state(source).get("world_size", 0))
        for what, there, here in (
            ("the world size", saved_world, self.world),
            ("deepspeed.zero_stage", theirs.deepspeed.zero_stage, self.cfg.deepspeed.zero_stage),
            ("optim.name", theirs.optim.name, self.cfg.optim.name),
        ):
            if there != here:
                raise ConfigError(
                    f"{key}: {what} is {there} there but {here} here; the optimizer state loads into the "
                    "same layout only (leave train.init_optimizer=false for a fresh optimizer)"
                )

    def _init_weights(self) -> tuple[dict[str, torch.Tensor], Path]:
        """The weights `train.init_from` names, checked against this run: a Hugging Face folder
        (safetensors), or one of our checkpoints (a `step_<N>` folder, or a run folder: its newest
        complete one) verified against its manifest on every rank before anything is unpickled,
        consolidated from whatever ZeRO stage and world size wrote it."""
        from llmtrain.config import config_from_yaml
        from llmtrain.inference import load_weights
        from llmtrain.model.hf import load_hf_folder

        cfg = self.cfg
        key = f"train.init_from={cfg.train.init_from}"
        source = Path(cfg.train.init_from).expanduser()
        if (source / "config.json").is_file():
            _check_export_tokenizer(source, self.terms.tokenizer_hash, key)
            if cfg.train.init_optimizer:
                self._check_init_optimizer(source, None)
            return load_hf_folder(source, cfg.model), source
        path = _init_checkpoint(source, key)
        self.phase = f"verifying {path} (train.init_from)"
        if problem := self._verified(path):
            raise CheckpointError(f"{key}: {problem}")
        state = ckpt.read_state(path)
        expected = (state.get("run") or {}).get("tokenizer_hash", state.get("tokenizer_hash"))
        if expected and expected != self.terms.tokenizer_hash:
            raise CheckpointError(
                f"{key}: trained with another tokenizer (hash {expected[:12]}) than {cfg.data_dir}'s "
                f"(hash {self.terms.tokenizer_hash[:12]}); prepare the new data with tokenizer.path=<the "
                "source run's data.dir>/tokenizer.model"
            )
        theirs = config_from_yaml(path / ckpt.CONFIG_FILE)
        _check_same_model(theirs.model, cfg.model, key)
        if cfg.train.init_optimizer:
            self._check_init_optimizer(path, theirs)
        self.phase = f"loading the weights of {path} (train.init_from)"
        return load_weights(path), path

    def _restore(self, resume_from: Path | None, saved: dict | None) -> None:
        """Load the checkpoint into every stateful part; write config.yaml; open the metrics."""
        from llmtrain.io import write_atomic
        from llmtrain.train.metrics import MetricsLogger

        cfg = self.cfg
        self.guard = Guard(cfg.guard)
        self.checkpoints = ckpt.CheckpointManager(
            self.run_dir,
            self.backend,
            rank=self.rank,
            world_size=self.world,
            keep_last=cfg.checkpoint.keep_last,
        )
        self.start_step = 0
        if resume_from is not None:
            self.phase = f"loading {resume_from}"
            self.checkpoints.restore(resume_from, self._resumable())
            self.start_step = int(saved["step"])
            self._say(f"resumed from {resume_from} at step {self.start_step}")
            if self.start_step >= cfg.train.max_steps:
                self._say(f"train.max_steps={cfg.train.max_steps} already reached; nothing to do")
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.yaml", _config_yaml(cfg))
        saved = saved or {}
        wandb_id = (saved.get("metrics") or {}).get("wandb_run_id", saved.get("wandb_run_id"))
        self.metrics = MetricsLogger(
            cfg,
            self.run_dir,
            self.rank,
            wandb_run_id=wandb_id,
            start_step=self.start_step,
            total_steps=cfg.train.max_steps,
        )

    # -- helpers --------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if self.rank == 0:  # stderr, so a scheduler's error log shows it
            print(f"llmtrain train: {message}", file=sys.stderr)

    def _resumable(self) -> dict:
        return {"loader": self.train_loader, "guard": self.guard}

    def _agree_on_error(self, error: str | None) -> str | None:
        """The first error any rank saw (every rank must call this)."""
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, error)
        return next((e for e in gathered if e), None)

    def _verified(self, path: Path) -> str | None:
        """Collective: None if `path` verifies on every rank's share, else the first problem."""
        error = None
        try:
            ckpt.verify(
                path,
                trust_unverified=self.cfg.checkpoint.trust_unverified,
                rank=self.rank,
                world_size=self.world,
            )
        except CheckpointError as err:
            error = str(err)
        return self._agree_on_error(error)

    def _find_resume(self) -> Path | None:
        """The checkpoint `resume` asks for, verified; `auto` falls back to older ones, loudly."""
        cfg = self.cfg
        if cfg.resume != "auto":
            path = ckpt.find_checkpoint(self.run_dir, cfg.resume)
            if path is not None and (problem := self._verified(path)):
                raise CheckpointError(f"resume={cfg.resume}: {problem}")
            return path
        for path in ckpt.complete_checkpoints(self.run_dir):
            problem = self._verified(path)
            if problem is None:
                return path
            self._say(f"WARNING: not resuming from {path.name}: {problem}; trying an older checkpoint")
        return None

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> int:
        from llmtrain.train.stop import StopSignal

        stop = StopSignal()
        stop.install()
        try:
            return self._loop(stop)
        except RuntimeError as err:
            if _is_collective_failure(err):
                raise JobError(
                    f"rank {self.rank}: {self.phase}: a collective failed (a rank stalled or died; "
                    f"train.collective_timeout_s={self.cfg.train.collective_timeout_s:g}): {_first_line(err)}"
                ) from None
            raise
        finally:
            stop.restore()
            self.metrics.close()
            if hasattr(self.train_loader, "close"):
                self.train_loader.close()

    def _loop(self, stop) -> int:
        from llmtrain.model.flops import flops_per_token, mfu, peak_flops

        cfg, device = self.cfg, self.device
        max_steps = cfg.train.max_steps
        flops_tok = flops_per_token(cfg.model, cfg.train.seq_len)
        peak = peak_flops(precision=cfg.train.precision) if device.type == "cuda" else None
        tokens_per_step = self.global_batch * cfg.train.seq_len

        where = (
            "on the device" if self.backend.steps_on_device else "DeepSpeed's, on the host (a sync per step)"
        )
        self._say(f"{self.precision_note}; clipping and non-finite skips: {where}")
        sync_debug = cfg.train.sync_debug != "off" and device.type == "cuda"
        if cfg.train.sync_debug != "off" and not sync_debug:
            self._say(f"train.sync_debug={cfg.train.sync_debug}: ignored on {device.type} (it watches a GPU)")
        self.backend.train()
        window = _Window.empty(device)
        pending: list[tuple[int, float | torch.Tensor]] = []  # (step, skipped) not yet seen by the guard
        last_save = time.monotonic()
        saved_step = step = self.start_step
        save_pending = False  # a periodic save waiting for an applied update (see below)
        last_checkpoint: dict[str, float] = {}  # reported with the next training record
        while step < max_steps:
            # -- one optimizer step: lr from the schedule, then accumulate over micro-batches
            self.phase = f"step {step + 1}"
            lr = _lr(cfg, step)
            self.backend.set_lr(lr)
            logging_step = (step + 1) % cfg.logging.every_steps == 0 or step + 1 == max_steps
            if sync_debug and step > self.start_step:  # the run's first step sets up lazily
                torch.cuda.set_sync_debug_mode(cfg.train.sync_debug)
            step_loss = torch.zeros((), device=device)
            for micro in range(self.accum):
                t0 = time.perf_counter()
                batch = self.train_loader.next_batch()
                window.data_wait += time.perf_counter() - t0
                inputs, targets, doc_ids = batch_to_device(batch, device, cfg.model.doc_mask)
                loss = self.backend(inputs, targets, doc_ids)
                if micro == 0 and faults.maybe_fail("loss", step + 1):
                    loss = loss * float("nan")  # LLMTRAIN_FAULT=loss@N:nan, one rank's blow-up
                self.backend.backward(loss)
                self.backend.step(measure_grad_norm=logging_step)
                step_loss += loss.detach().float()
            skipped = self.backend.last_skip
            window.add(step_loss, self.accum, skipped)
            if sync_debug:  # the logging, checkpoint and guard work below reads the device on purpose
                torch.cuda.set_sync_debug_mode("default")
            step += 1
            window.steps += 1
            pending.append((step, skipped))
            faults.maybe_fail("step", step)
            # The guard sees each step's skip at once where it was decided on the host; where it was
            # decided on the device, at the next logging or checkpoint step (reading it is a sync).
            save_now = cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0
            if not torch.is_tensor(skipped) or logging_step or save_now or save_pending:
                verdict = self._settle(pending)
                if verdict.action != "ok":
                    step = self._act(verdict, step)
                    window = _Window.empty(device)
                    continue

            # -- logging interval: the only per-step host sync, shared with the rank agreement
            stop_now = False
            if step % cfg.logging.every_steps == 0 or step == max_steps:
                self.phase = f"step {step}: agreeing on the logged metrics"
                due = (
                    cfg.checkpoint.every_minutes is not None
                    and self.rank == 0
                    and time.monotonic() - last_save >= 60 * cfg.checkpoint.every_minutes
                )
                loss, due_any, stop_any = self._reduce_window(window, due, stop.received is not None)
                elapsed = time.perf_counter() - window.start - window.excluded
                tokens_per_s = window.steps * tokens_per_step / elapsed
                record = {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": self.backend.grad_norm(),
                    "tokens_per_s": tokens_per_s,
                    "tokens_per_s_per_device": tokens_per_s / self.world,
                    "step_time_s": elapsed / window.steps,
                    "data_wait_share": window.data_wait / elapsed,
                    **_memory_record(device),
                    "tokens": step * tokens_per_step,
                    **self.guard.metrics(),
                    **{f"epoch/{k}": v for k, v in self.train_loader.epochs_per_source().items()},
                }
                util = mfu(tokens_per_s / self.world, flops_tok, peak)
                if util is not None:
                    record["mfu"] = util
                record.update(last_checkpoint)
                last_checkpoint = {}
                self.metrics.log(step, record)
                save_now = save_now or due_any
                stop_now = stop_any
                window = _Window.empty(device)
                if loss is not None:
                    verdict = self.guard.on_log(step, loss)
                    if verdict.reason and verdict.action == "ok":
                        self._say(verdict.reason)
                    if verdict.action != "ok":
                        step = self._act(verdict, step)
                        continue

            t0 = time.perf_counter()
            if self.val_loader is not None and (step % cfg.train.val_every == 0 or step == max_steps):
                self.phase = f"validation at step {step}"
                val = evaluate(self.backend, self.val_loader, device, doc_mask=cfg.model.doc_mask)
                self.metrics.log_val(step, val)
            if self.downstream is not None and (step % cfg.train.eval_every == 0 or step == max_steps):
                self.phase = f"downstream evaluation at step {step}"
                self.metrics.log_eval(step, self.downstream.run(self.backend))
            # A periodic save that falls on a skipped update waits for the next applied one, so a run
            # of non-finite steps (which the guard may stop) leaves no checkpoint past the last good step.
            save_pending = save_pending or save_now
            periodic = save_pending and self.guard.consecutive == 0
            if periodic or stop_now or (step == max_steps and cfg.checkpoint.at_end):
                saved = self._save(step)
                last_checkpoint = {"checkpoint_s": saved["ckpt_s"], "checkpoint_gb": saved["ckpt_gb"]}
                saved_step, last_save = step, time.monotonic()
                save_pending = False
            window.excluded += time.perf_counter() - t0
            if stop_now:
                self._say(f"{stop.received or 'signal'}: saved step {saved_step}, exiting")
                return 0
        return 0

    def _reduce_window(self, window: _Window, due: bool, stopping: bool) -> tuple[float | None, bool, bool]:
        """(mean loss over applied updates, save due on any rank, stop asked on any rank): one all-reduce."""
        import torch.distributed as dist

        flags = torch.tensor([float(due), float(stopping)], dtype=torch.float32, device=self.device)
        packed = torch.cat([window.loss_sum.reshape(1), window.micro_batches.reshape(1), flags])
        dist.all_reduce(packed)
        loss_sum, micro_batches, due_any, stop_any = packed.tolist()
        loss = loss_sum / micro_batches if micro_batches else None
        return loss, due_any > 0, stop_any > 0

    def _save(self, step: int) -> dict[str, float]:
        self.phase = f"saving {ckpt.step_dir(self.run_dir, step)}"
        states = {
            "run": self.terms,
            "loader": self.train_loader,
            "guard": self.guard,
            "metrics": self.metrics,
        }
        saved = self.checkpoints.save(
            step,
            states,
            extra={"zero_stage": self.cfg.deepspeed.zero_stage},
            config_yaml=_config_yaml(self.cfg),
        )
        self.metrics.write(
            f"llmtrain train: saved {ckpt.step_dir(self.run_dir, step)} ({saved['ckpt_gb']:.3f} GB "
            f"in {saved['ckpt_s']:.2f} s)"
        )
        return saved

    def _settle(self, pending: list[tuple[int, float | torch.Tensor]]) -> Verdict:
        """The guard's verdict on the steps in `pending` (emptied), in order: the first that is not "ok",
        reporting the skips it lets pass. Device-side flags are read in one transfer."""
        on_device = [flag for _, flag in pending if torch.is_tensor(flag)]
        read = iter(torch.stack(on_device).tolist() if on_device else ())
        steps = [(step, next(read) if torch.is_tensor(flag) else flag) for step, flag in pending]
        pending.clear()
        for step, skipped in steps:
            verdict = self.guard.on_step(step, skipped=skipped > 0)
            if verdict.reason and verdict.action == "ok":  # stop / rollback report for themselves
                self._say(verdict.reason)
            if verdict.action != "ok":
                return verdict
        return Verdict("ok")

    def _act(self, verdict: Verdict, step: int) -> int:
        """Carry out a guard's `stop` or `rollback`; returns the step to continue from."""
        if verdict.action == "stop":
            raise GuardStop(
                f"{verdict.reason}; stopping (guard.nonfinite={self.cfg.guard.nonfinite}), nothing saved"
            )
        rollbacks = self.guard.rollbacks + 1
        if rollbacks > self.cfg.guard.max_consecutive_skips:
            raise GuardStop(f"{verdict.reason}; {rollbacks - 1} rollbacks did not help, stopping")
        self.phase = f"rolling back after step {step}"
        target = next((p for p in ckpt.complete_checkpoints(self.run_dir) if self._verified(p) is None), None)
        if target is None:
            raise GuardStop(
                f"{verdict.reason}; guard.nonfinite=rollback but there is no checkpoint to roll back to"
            )
        saved = self.checkpoints.restore(target, self._resumable())
        self.guard.rollbacks = rollbacks
        skip = self.cfg.guard.skip_batches
        loader_state = self.train_loader.state_dict()
        loader_state["next_sample"] += skip * self.global_batch
        self.train_loader.load_state_dict(loader_state)
        back_to = int(saved["step"])
        self.metrics.rewind(back_to)
        self._say(f"rolled back to {target.name} (step {back_to}), skipping the next {skip} batch(es)")
        return back_to


def _init_checkpoint(source: Path, key: str) -> Path:
    """The complete checkpoint a `train.init_from` path names (not yet verified)."""
    if not source.is_dir():
        raise CheckpointError(f"{key}: no such folder")
    if (source / ckpt.STATE_FILE).is_file() or source.name.startswith("step_"):
        if not ckpt.is_complete(source):
            raise CheckpointError(f"{key}: checkpoint {source} is incomplete (no {ckpt.COMPLETE} marker)")
        return source
    run_dir = source.parent if source.name == ckpt.CHECKPOINTS else source
    if not (run_dir / ckpt.CHECKPOINTS).is_dir():
        raise CheckpointError(
            f"{key}: neither a Hugging Face folder (config.json + model.safetensors) nor a llmtrain "
            "checkpoint (checkpoints/step_<N>) or run folder"
        )
    found = ckpt.latest_complete(run_dir)
    if found is None:
        raise CheckpointError(f"{key}: no complete checkpoint under {run_dir / ckpt.CHECKPOINTS}")
    return found


def _check_same_model(theirs, ours, key: str) -> None:
    """ConfigError naming the first model.* field that differs in shape or function."""
    from llmtrain.model.hf import SHAPE_FIELDS

    fields = (*SHAPE_FIELDS, "max_seq_len") if ours.arch == "gpt2" else SHAPE_FIELDS  # learned positions
    for name in fields:
        a, b = getattr(theirs, name), getattr(ours, name)
        if a != b:
            raise ConfigError(f"{key}: model.{name} is {a} there but {b} in this run's config")


def _check_export_tokenizer(folder: Path, tokenizer_hash: str, key: str) -> None:
    """An `llmtrain export` folder records its tokenizer (llmtrain.json): it must be this run's."""
    import json

    try:
        recorded = json.loads((folder / "llmtrain.json").read_text(encoding="utf-8")).get("tokenizer_hash")
    except (OSError, ValueError, AttributeError):
        return  # not one of our exports: nothing recorded to compare
    if recorded and recorded != tokenizer_hash:
        raise CheckpointError(
            f"{key}: exported with another tokenizer (hash {recorded[:12]}) than this run's data.dir "
            f"(hash {tokenizer_hash[:12]})"
        )


def _lr(cfg: Config, step: int) -> float:
    from llmtrain.train.schedule import lr_at

    return lr_at(step, base_lr=cfg.optim.lr, schedule=cfg.schedule, max_steps=cfg.train.max_steps)


def _is_collective_failure(err: RuntimeError) -> bool:
    text = str(err).lower()
    return any(
        marker in text
        for marker in (
            "timed out",
            "timeout",
            "connection closed",
            "connection reset",
            "gloo",
            "nccl",
            "broken pipe",
        )
    )


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(err).__name__
