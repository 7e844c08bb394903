"""Where training metrics go: console progress, `<run_dir>/metrics.jsonl`, wandb, TensorBoard, and a
loss-curve PNG at the end.

Only rank 0 does anything; on other ranks every method is a no-op, so the trainer calls the logger
unconditionally. wandb, TensorBoard and matplotlib are imported only when used, so none of them is
needed to train.

metrics.jsonl holds one JSON object per logged step (`{"step": s, "loss": ..., "lr": ...}`) and one per
validation (`{"step": s, "val_loss": ..., ...}`), with floats written at full precision (Python's
shortest round-trip repr) and NaN/inf written as null so the file is strict JSON. A resumed run
appends, after dropping records with step > start_step that a crashed run left behind, so the file
stays monotonic in step. Each record is flushed but not fsynced: cheap enough to call every step.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmtrain.errors import UserError
from llmtrain.io import write_atomic

JSONL_NAME = "metrics.jsonl"
PLOT_NAME = "loss_curve.png"


def _plain(value: Any) -> Any:
    """A JSON-ready scalar: tensors and numpy scalars become Python numbers; NaN/inf become None."""
    if hasattr(value, "item") and callable(value.item):  # torch tensor / numpy scalar
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return value if math.isfinite(value) else None


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl in file order; an unreadable line (a crash mid-write) is skipped."""
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: Path, start_step: int) -> None:
    """Keep only records with step <= start_step (those before the checkpoint being resumed)."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    kept = [json.dumps(r) for r in read_metrics(path) if r["step"] <= start_step]
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:
        write_atomic(path, new_text, durable=False)


def _format_console(step: int, total: int, metrics: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, fmt in (
        ("loss", "loss", "{:.4f}"),
        ("lr", "lr", "{:.3e}"),
        ("grad_norm", "gnorm", "{:.3f}"),
        ("tokens_per_s", "tok/s", "{:,.0f}"),
        ("mfu", "mfu", "{:.1%}"),
    ):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Console:
    """A tqdm bar with ETA on an interactive terminal; plain lines (with ETA) elsewhere, e.g. in a
    SLURM log, or when `logging.progress=false`."""

    def __init__(self, *, use_bar: bool, start_step: int, total_steps: int):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.bar = None
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1
            )

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            postfix = _format_console(step, self.total, metrics).split(" | ", 1)[1:]
            self.bar.set_postfix_str(postfix[0] if postfix else "", refresh=False)
            self.bar.update(max(step - self.bar.n, 0))  # redraws, rate-limited by tqdm's mininterval
            return
        done = step - self.start_step
        line = _format_console(step, self.total, metrics)
        if done > 0:
            elapsed = time.perf_counter() - self.t0
            line += f" | eta {_format_duration(elapsed / done * (self.total - step))}"
        print(line, flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsLogger:
    """Rank 0's sink for training and validation metrics (see module docstring).

    `wandb_run_id` is the id stored in the checkpoint being resumed (None for a fresh run): the
    wandb run is reopened with `resume="allow"`, so the dashboard continues one run. The id in use
    is exposed as `.wandb_run_id` for the next checkpoint. `start_step` is the number of completed
    steps at start (0 for a fresh run); `total_steps` sizes the progress bar.
    """

    def __init__(
        self,
        cfg,
        run_dir: str | Path,
        rank: int,
        *,
        wandb_run_id: str | None = None,
        start_step: int = 0,
        total_steps: int,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.start_step = start_step
        self.total_steps = total_steps
        self._wandb_run_id = wandb_run_id
        self._wandb = None
        self._tb = None
        self._file = None
        self._console: _Console | None = None
        self._closed = False
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / JSONL_NAME
        truncate_metrics(self.jsonl_path, start_step)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        log_cfg = cfg.logging
        self._console = _Console(
            use_bar=bool(log_cfg.progress) and sys.stderr.isatty(),
            start_step=start_step,
            total_steps=total_steps,
        )
        if log_cfg.wandb.mode != "disabled":
            self._wandb = self._start_wandb()
            self._wandb_run_id = self._wandb.id
        if log_cfg.tensorboard:
            self._tb = self._start_tensorboard()

    @property
    def wandb_run_id(self) -> str | None:
        return self._wandb_run_id

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the logger: the wandb run to reopen on resume."""
        return {"wandb_run_id": self._wandb_run_id}

    def rewind(self, step: int) -> None:
        """Drop records past `step` (after a rollback to that step's checkpoint), so the file stays
        monotonic in step."""
        if self._file is None:
            return
        self._file.close()
        truncate_metrics(self.jsonl_path, step)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    # -- sinks ---------------------------------------------------------------------------------
    def _start_wandb(self):
        try:
            import wandb
        except ImportError:
            raise UserError(
                f"logging.wandb.mode={self.cfg.logging.wandb.mode} needs the wandb package "
                "(pip install wandb), or set logging.wandb.mode=disabled"
            ) from None
        w = self.cfg.logging.wandb
        return wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name or self.cfg.run.name,
            tags=list(w.tags) or None,
            dir=str(self.run_dir),
            mode=w.mode,
            id=self._wandb_run_id,
            resume="allow" if self._wandb_run_id else None,
            config=asdict(self.cfg),
        )

    def _start_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "logging.tensorboard=true needs the tensorboard package (pip install tensorboard), "
                "or set logging.tensorboard=false"
            ) from None
        # purge_step hides events a crashed run wrote past the checkpoint being resumed
        purge = self.start_step + 1 if self.start_step > 0 else None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)

    def _emit(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step)}
        record.update((str(k), _plain(v)) for k, v in metrics.items())
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numbers = _numeric(record)
        numbers.pop("step")
        if self._wandb is not None:
            self._wandb.log(numbers, step=int(step))
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, int(step))
        return record

    # -- public API ----------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """A training record after `step` completed updates: loss, lr, grad_norm, tokens_per_s, ..."""
        if not self.enabled or self._closed:
            return
        record = self._emit(step, metrics)
        self._console.step(int(step), record)

    def log_val(self, step: int, metrics: dict[str, Any]) -> None:
        """A validation record: must carry `val_loss`; per-source keys like `val/<source>/loss`."""
        if not self.enabled or self._closed:
            return
        if "val_loss" not in metrics:
            raise ValueError(f"log_val needs a 'val_loss' entry, got keys {sorted(metrics)}")
        record = self._emit(step, metrics)
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in _numeric(record).items() if k != "step" and k.startswith("val")
        )
        self._console.write(f"step {int(step)} validation: {shown}")

    def log_eval(self, step: int, metrics: dict[str, Any] | None) -> None:
        """A downstream-evaluation record (`eval/<task>/<metric>`, `eval_s`); None (other ranks) is skipped."""
        if not self.enabled or self._closed or metrics is None:
            return
        record = self._emit(step, metrics)
        shown = ", ".join(
            f"{k.removeprefix('eval/')} {v:.4f}"
            for k, v in _numeric(record).items()
            if k.startswith("eval/") and not k.endswith("_stderr")
        )
        seconds = record.get("eval_s")
        took = f" ({seconds:.1f} s)" if isinstance(seconds, float) else ""
        self._console.write(f"step {int(step)} downstream eval{took}: {shown}")

    def write(self, line: str) -> None:
        """A console line from rank 0 that does not break the progress bar (no-op on other ranks)."""
        if self.enabled and not self._closed:
            self._console.write(line)

    def close(self) -> None:
        """Flush and close every sink, then draw loss_curve.png (when `logging.plot`). Idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._console.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.cfg.logging.plot:
            plot_loss_curve(self.jsonl_path, self.run_dir / PLOT_NAME, title=self.cfg.run.name)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plot_loss_curve(jsonl_path: str | Path, out_path: str | Path, *, title: str = "") -> Path | None:
    """Train loss (line) and validation losses (points) against step, from a metrics.jsonl.

    Returns the PNG path, or None when there is nothing to plot or matplotlib is missing. Uses the
    Agg canvas directly (no pyplot), so it never touches the process-wide backend.
    """
    records = read_metrics(jsonl_path)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float))]
    sources = sorted({k for r in records for k in r if k.startswith("val/") and k.endswith("/loss")})
    if not train and not val:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(
            f"note: matplotlib is not installed; {out_path} not written (pip install matplotlib)",
            file=sys.stderr,
        )
        return None
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.0)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", markersize=4)
    if len(sources) > 1:
        for key in sources:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            ax.plot(*zip(*points), "x--", label=key, markersize=4, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    image = io.BytesIO()
    fig.savefig(image, format="png")
    write_atomic(out_path, image.getvalue(), durable=False)
    return out_path
