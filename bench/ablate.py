"""Learning-recipe ablations at an equal budget: which option buys how much held-out loss per token.

Every variant trains the same number of steps on the same prepared corpus, sample for sample (the
loader's order depends on data.seed only), at (nearly) the same non-embedding parameter count, in a
fresh process each. The held-out split is cut in two, so nothing reported was looked at while
choosing settings:
    tune    the first half of the validation windows: the in-loop validation curve (`train.val_every`)
            that settings were chosen on, and the "tokens to reach the baseline" column;
    report  the second half, scored once per finished run (loss, bits per UTF-8 byte).

    python bench/ablate.py --config-dir DIR data=NAME [--variants a,b] [--seeds 0,1] [--steps 300]
                           [--out bench/out/ablate] [--threads 1]

Writes <out>/results.json, <out>/table.md (the table in docs/learning.md) and <out>/curves.png.
Throughput is measured by the same runs; on a shared machine take it from `--speed` (short runs of
each variant, interleaved, one at a time), which prints tokens/s as a ratio to the first variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# 4 layers of width 128 (head dim 32), context 256, 16 sequences per step, fp32, one process: a run
# of 300 steps (1.2 M tokens) takes minutes on one CPU core, so a table of a dozen runs fits a session.
SHAPE = [
    "model.n_layers=4",
    "model.d_model=128",
    "model.n_heads=4",
    "model.n_kv_heads=4",
    "model.max_seq_len=256",
    "model.dropout=0.0",
    "train.seq_len=256",
    "train.micro_batch_size=16",
    "train.precision=fp32",
    "deepspeed=zero0",
    "checkpoint.every_steps=0",
    "checkpoint.at_end=true",
    "logging.progress=false",
    "logging.plot=false",
]
# nanoGPT's recipe (its train.py defaults, warmup scaled to the short run)
NANOGPT = [
    "optim=adamw",
    "optim.lr=6e-4",
    "optim.weight_decay=0.1",
    "optim.beta1=0.9",
    "optim.beta2=0.95",
    "train.grad_clip=1.0",
    "schedule=cosine",
    "schedule.warmup_steps=30",
    "schedule.min_lr_ratio=0.1",
]
GPT2 = ["model=gpt2_124m", "model.ffn_hidden=512", "model.tie_embeddings=true"]
# SwiGLU at 344 ~ 2/3 x 512: the MLP parameters of GPT-2's 4 x 128 within 1%; a multiple of 8, since
# a 341-wide matmul runs 30% slower per flop on a CPU (oneDNN's vector width)
LLAMA = ["model=tiny", "model.ffn_hidden=344", "model.tie_embeddings=true"]
MUON = ["optim=muon", "optim.muon_lr=0.03", "optim.lr=3e-3", "train.grad_clip=0"]
MODERN_MODEL = [
    "model.qk_norm=true",
    "model.activation=relu2",
    "model.ffn_hidden=512",
    "model.tie_embeddings=false",
    "model.zero_init_head=true",
    "model.zero_init_proj=true",
    "model.logit_softcap=15.0",
]
WSD = ["schedule=wsd", "schedule.warmup_steps=30", "schedule.decay_fraction=0.4", "schedule.min_lr_ratio=0.0"]
MODERN = [*LLAMA, *MUON, *MODERN_MODEL, *WSD]


def without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.split("=")[0] not in keys]


VARIANTS: dict[str, tuple[str, list[str]]] = {
    "gpt2_adamw": ("GPT-2-style, AdamW, nanoGPT's recipe (the baseline)", [*GPT2, *NANOGPT]),
    "gpt2_adamw_lr2e-3": ("the baseline at a 3.3x higher lr", [*GPT2, *NANOGPT, "optim.lr=2e-3"]),
    "llama_adamw": ("Llama-style (RMSNorm, SwiGLU, RoPE), same recipe", [*LLAMA, *NANOGPT]),
    "llama_muon": ("+ Muon (hidden matrices), AdamW for the rest", [*LLAMA, *NANOGPT, *MUON]),
    "modern": (
        "+ QK-norm, ReLU², untied zero-init head, zero-init proj, soft-cap 15, WSD",
        [*NANOGPT, *MODERN],
    ),
    "modern_no_qknorm": ("modern without QK-norm", [*NANOGPT, *without(MODERN, "model.qk_norm")]),
    "modern_swiglu": (
        "modern with SwiGLU (344) instead of ReLU²",
        [*NANOGPT, *without(MODERN, "model.activation", "model.ffn_hidden"), "model.ffn_hidden=344"],
    ),
    "modern_no_softcap": (
        "modern without the logit soft-cap",
        [*NANOGPT, *without(MODERN, "model.logit_softcap")],
    ),
    "modern_tied": (
        "modern with the head tied to the embedding",
        [
            *NANOGPT,
            *without(MODERN, "model.tie_embeddings", "model.zero_init_head"),
            "model.tie_embeddings=true",
        ],
    ),
    "modern_cosine": (
        "modern with the baseline's cosine schedule",
        [*NANOGPT, *without(MODERN, *[w.split("=")[0] for w in WSD]), "schedule=cosine"],
    ),
    "modern_no_zero_init": (
        "modern without the zero inits",
        [*NANOGPT, *without(MODERN, "model.zero_init_head", "model.zero_init_proj")],
    ),
}


def fail(message: str) -> int:
    print(f"ablate: {message}", file=sys.stderr)
    return 2


def run_variant(name: str, overrides: list[str], seed: int, out: Path, args) -> Path:
    run_dir = out / "runs" / f"{name}_s{seed}"
    done = run_dir / "checkpoints" / f"step_{args.steps}" / "COMPLETE"
    if done.exists() and not args.rerun:
        print(f"ablate: {name} seed {seed}: done before, reused ({run_dir})")
        return run_dir
    if run_dir.is_symlink():  # a table gathered from runs elsewhere: leave those runs alone
        run_dir.unlink()
    elif run_dir.exists():  # a rerun, or an unfinished run: start it over
        shutil.rmtree(run_dir)
    cmd = [
        sys.executable, "-m", "llmtrain.train",
        *(["--config-dir", str(args.config_dir)] if args.config_dir else []),
        *args.common, *SHAPE, *overrides,
        f"train.max_steps={args.steps}",
        f"train.val_every={args.val_every}",
        f"train.val_batches={args.tune_batches}",
        f"logging.every_steps={args.val_every}",
        f"run.seed={seed}",
        f"run.dir={run_dir}",
        "resume=none",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"ablate: {name} seed {seed}: training ({args.steps} steps)", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ablate: {name} seed {seed} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    (run_dir / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run_dir


def report_eval(run_dir: Path, micro_batch: int) -> dict[str, float]:
    """Loss and bits per byte of the final checkpoint on the report half of the validation windows."""
    import torch

    from llmtrain.config import Config
    from llmtrain.data.batch import batch_to_device
    from llmtrain.data.loader import ValLoader
    from llmtrain.inference import load_checkpoint_model

    cfg = Config()
    cfg.run.dir = str(run_dir)
    loaded = load_checkpoint_model(cfg, None, device=torch.device("cpu"))
    saved = loaded.config
    sums = {"nats": 0.0, "tokens": 0, "bytes": 0.0}
    for src in saved.data.sources:
        loader = ValLoader(
            saved.data_dir, [src], seq_len=saved.train.seq_len, micro_batch_size=micro_batch, doc_ids=False
        )
        n = loader.num_batches(src.name)
        bytes_per_token = loader.bytes_per_token(src.name)
        with torch.no_grad():
            for i, batch in enumerate(loader.batches(src.name)):
                if i < n // 2:
                    continue  # the tune half
                inputs, targets, _ = batch_to_device(batch, torch.device("cpu"), doc_mask=False)
                loss = loaded.model(inputs, targets)
                sums["nats"] += float(loss) * targets.numel()
                sums["tokens"] += targets.numel()
                sums["bytes"] += targets.numel() * bytes_per_token
    loss = sums["nats"] / sums["tokens"]
    return {
        "report_loss": loss,
        "report_bpb": sums["nats"] / math.log(2) / sums["bytes"],
        "report_tokens": sums["tokens"],
    }


def summarize(name: str, seed: int, run_dir: Path, micro_batch: int) -> dict:
    from llmtrain.config import config_from_yaml
    from llmtrain.model import build_model
    from llmtrain.train.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first window warms up
    saved = config_from_yaml(next((run_dir / "checkpoints").glob("step_*")) / "config.yaml")
    model = build_model(saved.model)
    tokens_per_step = saved.train.micro_batch_size * saved.train.seq_len
    return {
        "variant": name,
        "seed": seed,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "tokens": records[-1]["step"] * tokens_per_step if records else 0,
        "tokens_per_step": tokens_per_step,
        "val_curve": val,
        "tokens_per_s": statistics.median(speed) if speed else None,
        "wall_s": float((run_dir / "wall_s.txt").read_text()) if (run_dir / "wall_s.txt").exists() else None,
        **report_eval(run_dir, micro_batch),
    }


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step (linearly interpolated between validations) where the tune-split loss is <= target."""
    prev = (0, float("inf"))
    for step, loss in curve:
        if loss <= target:
            if not math.isfinite(prev[1]):
                return float(step)
            return prev[0] + (step - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (step, loss)
    return None


def table(results: list[dict], baseline: str) -> str:
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    base = by_variant[baseline]
    base_bpb = statistics.mean(r["report_bpb"] for r in base)
    base_final = statistics.mean(r["val_curve"][-1][1] for r in base)
    lines = [
        "| variant | params (non-emb) | tokens | val loss | bits/byte | × baseline | tokens to baseline's loss | tokens/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in by_variant.items():
        loss = [r["report_loss"] for r in runs]
        bpb = [r["report_bpb"] for r in runs]
        spread = f" ± {statistics.stdev(bpb):.4f}" if len(bpb) > 1 else ""
        reach = [steps_to_reach(r["val_curve"], base_final) for r in runs]
        if name == baseline:
            reach_text = "(the baseline)"
        elif all(x is not None for x in reach):
            frac = statistics.mean(reach) * runs[0]["tokens_per_step"] / runs[0]["tokens"]
            reach_text = f"{statistics.mean(reach) * runs[0]['tokens_per_step'] / 1e6:.2f}M ({frac:.0%})"
        else:
            reach_text = "not reached"
        speed = [r["tokens_per_s"] for r in runs if r["tokens_per_s"]]
        wall = [r["wall_s"] for r in runs if r["wall_s"]]
        lines.append(
            f"| {name} (×{len(runs)} seeds) | {runs[0]['params'] / 1e6:.2f}M ({runs[0]['params_non_embedding'] / 1e6:.2f}M) "
            f"| {runs[0]['tokens'] / 1e6:.2f}M | {statistics.mean(loss):.4f} | {statistics.mean(bpb):.4f}{spread} "
            f"| {statistics.mean(bpb) / base_bpb:.3f} | {reach_text} "
            f"| {statistics.median(speed):,.0f} | {statistics.median(wall):.0f} |"
            if speed and wall
            else f"| {name} | | | {statistics.mean(loss):.4f} | {statistics.mean(bpb):.4f}{spread} | | {reach_text} | | |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    colors = plt.get_cmap("tab20")(range(len(variants)))  # one color per variant, a dash per extra seed
    for r in results:
        steps, losses = zip(*r["val_curve"])
        tokens = [s * r["tokens_per_step"] / 1e6 for s in steps]
        color = colors[variants.index(r["variant"])]
        style = "-" if r["seed"] == min(x["seed"] for x in results if x["variant"] == r["variant"]) else "--"
        ax.plot(tokens, losses, style, color=color, label=f"{r['variant']} (seed {r['seed']})", linewidth=1.2)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss, tune half (nats/token)")
    ax.set_title("Equal-budget ablations: held-out loss per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def speed_rounds(names: list[str], args) -> int:
    """Short runs of each variant, interleaved over rounds, one at a time: tokens/s ratios to the first.

    A run logs every 5 steps; its figure is the median window after the first (which holds start-up
    and torch.compile of Muon's Newton-Schulz step). Validation and saving are outside the windows.
    """
    from llmtrain.train.metrics import read_metrics

    out = Path(args.out) / "speed"
    rates: dict[str, list[float]] = {n: [] for n in names}
    sub = argparse.Namespace(**{**vars(args), "steps": args.speed_steps, "val_every": 5, "rerun": True})
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else list(reversed(names)):
            run_dir = run_variant(name, VARIANTS[name][1], rnd, out, sub)
            speed = [
                r["tokens_per_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r
            ]
            rates[name].append(statistics.median(speed[1:] or speed))
    base = statistics.median(rates[names[0]])
    for name in names:
        med = statistics.median(rates[name])
        print(
            f"{name:24s} tokens/s median {med:8.0f}  ratio {med / base:.3f}  rounds {[round(x) for x in rates[name]]}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", type=Path)
    parser.add_argument("--variants", default="gpt2_adamw,llama_adamw,llama_muon,modern")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument(
        "--tune-batches", type=int, default=6, help="validation micro-batches of the tune half"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(BENCH / "out" / "ablate"))
    parser.add_argument("--rerun", action="store_true", help="train again although a finished run exists")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: the table and plot of the finished runs in --out",
    )
    parser.add_argument("--speed", action="store_true", help="only the interleaved throughput rounds")
    parser.add_argument("--speed-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("common", nargs="*", help="Hydra overrides for every variant, e.g. data=prose")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        return fail(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.speed:
        return speed_rounds(names, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            if args.table_only:
                run_dir = out / "runs" / f"{name}_s{seed}"
                if not (run_dir / "checkpoints" / f"step_{args.steps}" / "COMPLETE").exists():
                    continue
            else:
                run_dir = run_variant(name, VARIANTS[name][1], seed, out, args)
            results = [r for r in results if (r["variant"], r["seed"]) != (name, seed)]
            results.append(summarize(name, seed, run_dir, micro_batch=16))
            results_path.write_text(json.dumps(results, indent=1))
            print(f"ablate: {name} seed {seed}: report bpb {results[-1]['report_bpb']:.4f}", flush=True)
    order = {n: i for i, n in enumerate(VARIANTS)}
    results.sort(key=lambda r: (order.get(r["variant"], 99), r["seed"]))
    baseline = "gpt2_adamw" if any(r["variant"] == "gpt2_adamw" for r in results) else results[0]["variant"]
    text = table(results, baseline)
    (out / "table.md").write_text(text)
    plot(results, out / "curves.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
