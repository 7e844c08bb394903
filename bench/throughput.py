"""Training throughput of any preset and setting, measured through `llmtrain train`'s own loop.

Why: tokens/s, MFU and memory must be those of the product (the Trainer, the DeepSpeed backend, the
loader, the schedule and the guard), not of a hand-written loop beside it. Each configuration is
the usual Hydra overrides; this script builds `llmtrain.train.trainer.Trainer` with them, runs
`--warmup` untimed steps and `--steps` timed ones, and times every optimizer step (CUDA events on a
GPU, so no sync is added; the wall clock on a CPU). Checkpoints, validation and per-step logging
are off: they are measured elsewhere (bench_overhead.py, docs/performance.md).

    python bench/throughput.py model=tiny train.seq_len=256 train.micro_batch_size=8       # CPU
    python bench/throughput.py --vocab 32000 --warmup 5 --steps 20 --out tp.json \\
        model=llama_125m train.seq_len=1024 train.micro_batch_size=16 train.precision=bf16
    python bench/throughput.py model=tiny --sweep "deepspeed.zero_stage=0" --sweep "deepspeed.zero_stage=1"
    deepspeed --num_gpus 8 bench/throughput.py model=llama_1b ...                          # per device

Data: `--data-dir` of any prepared corpus (its sources are found in `shards/`), else the built-in
stdlib corpus, prepared once with `--vocab` into `.cache/bench/` (the model's vocabulary is the
tokenizer's). Sweep entries run one after another in this process, never at the same time.

Prints one table on stdout (everything else goes to stderr) and, with `--out`, a JSON file: per
configuration the step times, median tokens/s per device with its [min, max], MFU by the PaLM
convention (llmtrain.model.flops) where the device's peak is known (or `--peak-tflops`), and peak
memory: torch.cuda.max_memory_allocated on a GPU, the process's VmHWM (peak resident set) on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache" / "bench"


# ---------------------------------------------------------------------------------------- data


def prepared_sources(data_dir: Path) -> list[str]:
    """Names of the sources whose shards are complete in a prepared data folder."""
    shards = data_dir / "shards"
    names = sorted(p.name for p in shards.iterdir() if (p / "done.json").is_file()) if shards.is_dir() else []
    if not names or not (data_dir / "tokenizer.json").is_file():
        raise SystemExit(f"throughput: --data-dir {data_dir}: not a prepared data folder (llmtrain prepare)")
    return names


def data_overrides(data_dir: Path) -> list[str]:
    """Point a config at `data_dir`: only the source names (and weights) matter for training."""
    entries = ",".join(f"{{name:{name},path:{name},weight:1.0}}" for name in prepared_sources(data_dir))
    return [f"data.dir={data_dir}", f"data.sources=[{entries}]"]


def prepare_stdlib(vocab: int, cache: Path) -> Path:
    """The built-in stdlib corpus tokenized with a `vocab`-piece tokenizer, prepared once."""
    from llmtrain.config import load_config
    from llmtrain.data.prepare import prepare

    data_dir = cache / f"stdlib_v{vocab}"
    cfg = load_config(
        ["data=stdlib", f"data.dir={data_dir}", f"tokenizer.vocab_size={vocab}", "prepare.progress=false"]
    )
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the table only
        prepare(cfg)
    return data_dir


# ---------------------------------------------------------------------------------------- timing


class StepClock:
    """Marks the start of every optimizer step; the trainer sets the learning rate first thing in
    each step, so wrapping the backend's `set_lr` times the whole loop, nothing added inside it."""

    def __init__(self, device):
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self._torch = torch

    def mark(self) -> None:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()  # on the stream, in order with the step's kernels: no host sync
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def attach(self, backend) -> None:
        set_lr = backend.set_lr

        def timed_set_lr(lr: float) -> None:
            self.mark()
            set_lr(lr)

        backend.set_lr = timed_set_lr

    def step_seconds(self) -> list[float]:
        """Seconds of each step between consecutive marks."""
        if self.cuda:
            self._torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets VmHWM to the current VmRSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device) -> tuple[float | None, str]:
    """(GB, what was measured)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda_max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9, "cpu_vmhwm_process"
    except OSError:
        pass
    return None, "n/a"


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else (ordered[0],) * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
    }


# ---------------------------------------------------------------------------------------- one run


def bench_overrides(warmup: int, steps: int, run_dir: Path) -> list[str]:
    """What every measurement sets: one untimed step after the timed ones carries the only log."""
    total = warmup + steps + 1
    return [
        f"train.max_steps={total}",
        f"logging.every_steps={total}",
        "logging.progress=false",
        "logging.plot=false",
        "logging.tensorboard=false",
        "logging.wandb.mode=disabled",
        "train.val_every=0",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        "data.verify=size",  # the shard checksums are start-up cost, not throughput
        "resume=none",
        f"run.dir={run_dir}",
    ]


def measure(overrides: list[str], *, warmup: int, steps: int, peak_tflops: float | None) -> dict:
    """Build the Trainer with `overrides`, run it, and return the figures of its timed steps."""
    import torch

    from llmtrain.config import load_config
    from llmtrain.distributed import runtime
    from llmtrain.model.flops import flops_per_token, mfu, param_counts, peak_flops
    from llmtrain.train.trainer import Trainer

    cfg = load_config(overrides)
    info = runtime.init_distributed(timeout_s=cfg.train.collective_timeout_s)
    reset_peak_memory(info.device)
    trainer = Trainer(cfg, info)  # sets cfg.model.vocab_size from the tokenizer
    clock = StepClock(info.device)
    clock.attach(trainer.backend)
    trainer.fit()
    seconds = clock.step_seconds()[warmup : warmup + steps]
    memory_gb, memory_kind = peak_memory(info.device)
    tokens_per_device = trainer.global_batch * cfg.train.seq_len / info.world_size
    flops_tok = flops_per_token(cfg.model, cfg.train.seq_len)
    if peak_tflops is not None:
        peak = peak_tflops * 1e12
    elif info.device.type == "cuda":
        peak = peak_flops(precision=cfg.train.precision)
    else:
        peak = None
    step = spread(seconds)
    tps = tokens_per_device / step["median"]
    m = cfg.model
    result = {
        "status": "ok",
        "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "world_size": info.world_size,
        "arch": m.arch,
        "n_layers": m.n_layers,
        "d_model": m.d_model,
        "n_heads": m.n_heads,
        "vocab_size": m.vocab_size,
        "params": param_counts(m)["total"],
        "seq_len": cfg.train.seq_len,
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": trainer.accum,
        "global_batch_size": trainer.global_batch,
        "precision": cfg.train.precision,
        "zero_stage": cfg.deepspeed.zero_stage,
        "activation_checkpointing": m.activation_checkpointing,
        "compile": m.compile,
        "kernels": list(m.kernels),
        "warmup_steps": warmup,
        "timed_steps": len(seconds),
        "step_time_s": step,
        "step_times_s": seconds,
        "tokens_per_step_per_device": tokens_per_device,
        "tokens_per_s_per_device": tps,
        "tokens_per_s_per_device_min": tokens_per_device / step["max"],
        "tokens_per_s_per_device_max": tokens_per_device / step["min"],
        "flops_per_token": flops_tok,
        "peak_flops": peak,
        "mfu": mfu(tps, flops_tok, peak),
        "memory_gb": memory_gb,
        "memory_kind": memory_kind,
    }
    del trainer, clock
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------- report


def machine_info(threads: int | None) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(results: list[dict], common: list[str] | None = None) -> str:
    """One row per configuration, named by its own overrides; the shared ones (if given) head it."""
    width = max(16, *(len(r["label"]) + 2 for r in results))
    head = (
        f"{'configuration':<{width}}{'params':>8}{'seq':>6}{'mbs x acc':>10}{'ws':>4}{'prec':>6}{'zero':>5}"
        f"{'tok/s/device median [min, max]':>34}{'step ms median [min, max]':>30}{'MFU':>7}{'peak memory':>18}"
    )
    lines = [head, "-" * len(head)]
    if common is not None:
        lines.insert(0, f"common overrides: {' '.join(common) or '(none)'}")
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['label']:<{width}}FAILED: {r['error']}")
            continue
        st = r["step_time_s"]
        tok = (
            f"{r['tokens_per_s_per_device']:,.0f} [{r['tokens_per_s_per_device_min']:,.0f}, "
            f"{r['tokens_per_s_per_device_max']:,.0f}]"
        )
        ms = f"{st['median'] * 1e3:,.1f} [{st['min'] * 1e3:,.1f}, {st['max'] * 1e3:,.1f}]"
        util = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        kind = {"cuda_max_memory_allocated": "cuda", "cpu_vmhwm_process": "VmHWM"}.get(r["memory_kind"], "")
        mem = f"{r['memory_gb']:.2f} GB {kind}" if r["memory_gb"] is not None else "n/a"
        lines.append(
            f"{r['label']:<{width}}{r['params'] / 1e6:>7.1f}M{r['seq_len']:>6}"
            f"{r['micro_batch_size']:>6} x{r['grad_accum']:<2}{r['world_size']:>4}{r['precision']:>6}"
            f"{r['zero_stage']:>5}{tok:>34}{ms:>30}{util:>7}{mem:>18}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of llmtrain for every configuration")
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help='one configuration: overrides added to the common ones, e.g. "deepspeed.zero_stage=0"; '
        "repeat for several (run one after another)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, caches)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--data-dir", type=Path, help="a prepared data folder (llmtrain prepare)")
    parser.add_argument(
        "--vocab", type=int, default=8192, help="without --data-dir: tokenizer size of the stdlib corpus"
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where that corpus is kept")
    parser.add_argument(
        "--peak-tflops", type=float, help="device peak for MFU (default: the GPU table; n/a on a CPU)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed's
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        parser.error("--warmup must be >= 0 and --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launched = "RANK" in os.environ  # by deepspeed / torchrun; else a world of one made here
    if args.data_dir is not None:
        data_dir = args.data_dir.resolve()
        prepared_sources(data_dir)  # fails before the slow imports
    elif os.environ.get("LOCAL_RANK", "0") == "0":
        data_dir = prepare_stdlib(args.vocab, args.cache_dir.resolve())
    else:  # the other ranks of a node wait for its first rank's preparation
        data_dir = args.cache_dir.resolve() / f"stdlib_v{args.vocab}"
        while not (data_dir / "shards" / "stdlib" / "done.json").is_file():
            time.sleep(1)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    common = data_overrides(data_dir)
    if not torch.cuda.is_available():
        common.append("train.precision=fp32")  # the default bf16 is for GPUs; the user's overrides win
    configs = [shlex.split(entry) for entry in args.sweep] or [[]]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="llmtrain_throughput_") as tmp:
        for i, extra in enumerate(configs):
            label = " ".join(extra or args.overrides) or "(defaults)"
            overrides = [
                *common,
                *args.overrides,
                *extra,
                *bench_overrides(args.warmup, args.steps, Path(tmp) / f"run{i}"),
            ]
            print(f"throughput: [{i + 1}/{len(configs)}] {label}", file=sys.stderr)
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    result = measure(
                        overrides, warmup=args.warmup, steps=args.steps, peak_tflops=args.peak_tflops
                    )
            except Exception as err:  # one failed configuration (e.g. out of memory) does not end the sweep
                traceback.print_exc(file=sys.stderr)
                first = (str(err).strip().splitlines() or [""])[0][:200]
                result = {"status": "error", "error": f"{type(err).__name__}: {first}"}
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            results.append({"label": label, "overrides": [*args.overrides, *extra], **result})
    if os.environ.get("RANK", "0") == "0":
        print(table(results, args.overrides if args.sweep else []))
        if args.out is not None:
            report = {
                "machine": machine_info(args.threads),
                "data_dir": str(data_dir),
                "warmup": args.warmup,
                "steps": args.steps,
                "results": results,
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    if launched:
        from llmtrain.distributed import runtime

        runtime.shutdown()
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
