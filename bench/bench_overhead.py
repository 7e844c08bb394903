"""Framework overhead: tokens/s of `llmtrain train` against a bare PyTorch loop, one CPU process.

Both sides train the same model from the same seed on the same batches (the same loader), with
AdamW, gradient clipping and the same learning-rate schedule. The bare loop is what a user would
write by hand: forward, backward, clip, step. `llmtrain train` adds DeepSpeed, the schedule per step,
metrics and the loader position; checkpoints and validation are off (they are measured apart).
Repeats alternate the two, to spread the noise of a shared machine over both.

    python bench/bench_overhead.py --data-dir data/stdlib [--repeats 3] [--steps 40] [--zero 0 1]

Prints one table: tokens/s of each (median and min-max over repeats) and the slowdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = ["model=tiny", "model.n_layers=4", "model.d_model=256", "model.n_heads=4", "model.n_kv_heads=4"]


def overrides(
    data_dir: str, steps: int, warmup: int, zero: int, run_dir: Path, extra: list[str]
) -> list[str]:
    return [
        "debug=cpu",
        *MODEL,
        f"data.dir={data_dir}",
        "train.seq_len=128",
        "train.micro_batch_size=8",
        f"train.max_steps={steps}",
        f"logging.every_steps={warmup}",
        "logging.progress=false",
        "logging.plot=false",
        "train.val_every=0",
        "checkpoint.every_steps=0",
        "checkpoint.at_end=false",
        f"deepspeed.zero_stage={zero}",
        f"run.dir={run_dir}",
        *extra,
    ]


def llmtrain_tokens_per_s(cfg_overrides: list[str]) -> float:
    """Mean tokens/s the trainer logged, after its first (warm-up) logging window."""
    from llmtrain.config import load_config
    from llmtrain.train.metrics import read_metrics
    from llmtrain.train.trainer import main

    cfg = load_config(cfg_overrides)
    main(cfg)
    records = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "tokens_per_s" in r]
    steps = [r["step"] for r in records]
    # windows after the first: tokens over time, weighting each window by its steps
    spans = [b - a for a, b in zip(steps, steps[1:])]
    seconds = sum(s * r["step_time_s"] for s, r in zip(spans, records[1:]))
    tokens = sum(spans) * cfg.train.global_batch_size * cfg.train.seq_len
    return tokens / seconds


def bare_tokens_per_s(cfg_overrides: list[str], warmup: int) -> float:
    """forward / backward / clip / AdamW step by hand, on the same batches; timed after `warmup` steps."""
    from llmtrain.config import load_config
    from llmtrain.data.loader import build_train_loader
    from llmtrain.data.tokenizer import tokenizer_identity
    from llmtrain.model import build_model
    from llmtrain.train.optim import adamw, param_groups
    from llmtrain.train.schedule import lr_at

    cfg = load_config(cfg_overrides)
    cfg.model.vocab_size = tokenizer_identity(cfg.data_dir).vocab_size
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model)
    o = cfg.optim
    opt = adamw(
        param_groups(model, o), o, o.lr
    )  # the AdamW (groups, fused kernel) the trainer's engine steps
    loader = build_train_loader(cfg, 0, 1)
    running = torch.zeros(())
    steps = cfg.train.max_steps
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, base_lr=o.lr, schedule=cfg.schedule, max_steps=steps)
        tokens = loader.next_batch()["tokens"]
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.detach()
    elapsed = time.perf_counter() - start
    return (steps - warmup) * cfg.train.micro_batch_size * cfg.train.seq_len / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="a prepared data folder (llmtrain prepare)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps (also the logging interval)")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1], help="ZeRO stages to measure")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides for both sides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for zero in args.zero:
                ov = overrides(
                    args.data_dir, args.steps, args.warmup, zero, Path(tmp) / f"r{rep}z{zero}", args.extra
                )
                results.setdefault(f"bare-z{zero}", []).append(bare_tokens_per_s(ov, args.warmup))
                results.setdefault(f"llmtrain-z{zero}", []).append(llmtrain_tokens_per_s(ov))
                print(
                    f"repeat {rep} zero {zero}: bare {results[f'bare-z{zero}'][-1]:,.0f} tok/s, "
                    f"llmtrain {results[f'llmtrain-z{zero}'][-1]:,.0f} tok/s",
                    file=sys.stderr,
                )
    print(
        f"\n{'stage':<8}{'bare tok/s (median, min-max)':>34}{'llmtrain tok/s (median, min-max)':>38}{'slower':>9}"
    )
    for zero in args.zero:
        bare, ours = results[f"bare-z{zero}"], results[f"llmtrain-z{zero}"]
        slower = 1 - statistics.median(ours) / statistics.median(bare)
        print(
            f"ZeRO-{zero:<3}{statistics.median(bare):>14,.0f} ({min(bare):,.0f}-{max(bare):,.0f}){'':>4}"
            f"{statistics.median(ours):>16,.0f} ({min(ours):,.0f}-{max(ours):,.0f}){'':>6}{slower:>8.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
