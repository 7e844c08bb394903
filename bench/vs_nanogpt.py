"""llmtrain against karpathy/nanoGPT's train.py on the same small GPT-2, side by side, on a CPU.

Why: nanoGPT is the shortest honest PyTorch training loop; the gap between its tokens/s and ours on
the identical model is what our framework (DeepSpeed engine, loader, schedule, guard) costs.

The model: GPT-2 style, 4 layers, d_model 256, 4 heads, MLP 4 x 256, biases, tied embeddings,
context 256, batch 16, fp32, one process, no compile, no dropout; both train on the same token
stream (our prepared corpus, also written as nanoGPT's data/<dataset>/train.bin) with the same
vocabulary (nanoGPT's vocab_size is set to our padded embedding rows, so both compute the same
output matmul). Also our Llama-style model of the same width and depth (SwiGLU 768, RMSNorm, RoPE),
against the same nanoGPT figure. Each round runs every side once, in a fresh process each, with the
same thread count; rounds alternate the order to spread a shared machine's drift over all sides.

    python bench/vs_nanogpt.py --nanogpt /path/to/nanoGPT [--rounds 2] [--steps 60] [--threads 1]

The nanoGPT checkout is the user's (never downloaded here); nothing is written into it. Prints
tokens/s of each side per round, the ratio ours / nanoGPT, and the medians; `--out` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
LAYERS, WIDTH, HEADS, CONTEXT, BATCH = 4, 256, 4, 256, 16

COMMON = [
    f"model.n_layers={LAYERS}",
    f"model.d_model={WIDTH}",
    f"model.n_heads={HEADS}",
    f"model.n_kv_heads={HEADS}",
    f"model.max_seq_len={CONTEXT}",
    "model.tie_embeddings=true",
    "model.dropout=0.0",
    f"train.seq_len={CONTEXT}",
    f"train.micro_batch_size={BATCH}",
    "train.precision=fp32",
    "train.grad_clip=1.0",
]
OURS = {
    "llmtrain gpt2": ["model=gpt2_124m", f"model.ffn_hidden={4 * WIDTH}", *COMMON],
    "llmtrain llama": ["model=tiny", "model.ffn_hidden=null", *COMMON],
}
ITER_LINE = re.compile(r"^iter (\d+): loss [-\d.naninf]+, time ([\d.]+)ms", re.MULTILINE)
PARAMS_LINE = re.compile(r"number of parameters: ([\d.]+)M")


def fail(message: str) -> int:
    print(f"vs_nanogpt: {message}", file=sys.stderr)
    return 2


def nanogpt_dataset(data_dir: Path, out: Path, padded_vocab: int) -> Path:
    """nanoGPT's data/<dataset>/{train,val}.bin (uint16) and meta.pkl from our prepared shards."""
    from llmtrain.data.shards import ShardReader, list_shards

    sources = sorted(p.name for p in (data_dir / "shards").iterdir() if (p / "done.json").is_file())
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        parts = [ShardReader(p).tokens for s in sources for p in list_shards(data_dir, s, split)]
        np.concatenate(parts).astype(np.uint16).tofile(out / f"{split}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": padded_vocab}, f)  # read by nanoGPT's train.py
    return out


def child_env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in the user's nanoGPT checkout
        "WANDB_MODE": "disabled",
    }


def nanogpt_flags(dataset: Path, out_dir: Path, iters: int) -> list[str]:
    """train.py's overrides for the model and run above (its configurator takes --key=value)."""
    return [
        f"--dataset={dataset}",  # os.path.join('data', <absolute path>) is that path
        f"--out_dir={out_dir}",
        "--device=cpu",
        "--dtype=float32",
        "--compile=False",
        f"--n_layer={LAYERS}",
        f"--n_head={HEADS}",
        f"--n_embd={WIDTH}",
        f"--block_size={CONTEXT}",
        f"--batch_size={BATCH}",
        "--gradient_accumulation_steps=1",
        "--bias=True",
        "--dropout=0.0",
        "--grad_clip=1.0",
        "--eval_interval=1000000",  # its one evaluation, at iteration 0, reads a single batch
        "--eval_iters=1",
        "--log_interval=1",
        "--always_save_checkpoint=False",
        "--wandb_log=False",
        f"--max_iters={iters}",
    ]


def run_nanogpt(checkout: Path, dataset: Path, work: Path, args) -> dict:
    """tokens/s of nanoGPT's train.py over iterations warmup .. warmup+steps-1 (its own timings)."""
    iters = args.warmup + args.steps
    cmd = [sys.executable, str(checkout / "train.py"), *nanogpt_flags(dataset, work / "nanogpt_out", iters)]
    # configurator.py is read from the working directory, so nanoGPT runs in its checkout
    proc = subprocess.run(
        cmd, cwd=checkout, env=child_env(args.threads), capture_output=True, text=True, timeout=args.timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT train.py failed (rc {proc.returncode}): {proc.stderr.strip()[-800:]}")
    times = {int(i): float(ms) / 1e3 for i, ms in ITER_LINE.findall(proc.stdout)}
    seconds = [times[i] for i in range(args.warmup, iters) if i in times]
    if len(seconds) < args.steps:
        raise RuntimeError(
            f"nanoGPT printed {len(seconds)} of {args.steps} iteration times:\n{proc.stdout[-800:]}"
        )
    params = PARAMS_LINE.search(proc.stdout)
    return {
        "tokens_per_s": BATCH * CONTEXT / statistics.median(seconds),
        "step_times_s": seconds,
        "params_m_reported": float(params.group(1)) if params else None,
    }


def run_ours(name: str, data_dir: Path, work: Path, args) -> dict:
    """tokens/s of `llmtrain train`'s loop, through bench/throughput.py in a fresh process."""
    out = work / f"{name.replace(' ', '_')}.json"
    cmd = [
        sys.executable,
        str(BENCH / "throughput.py"),
        f"--data-dir={data_dir}",
        f"--warmup={args.warmup}",
        f"--steps={args.steps}",
        f"--out={out}",
        *OURS[name],
        f"deepspeed.zero_stage={args.zero}",
    ]
    proc = subprocess.run(
        cmd, env=child_env(args.threads), capture_output=True, text=True, timeout=args.timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name}: throughput.py failed (rc {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    result = json.loads(out.read_text())["results"][0]
    # nanoGPT's count leaves out the position table (not a matmul), ours includes it: compare like for like
    pos_table = CONTEXT * WIDTH if result["arch"] == "gpt2" else 0
    return {
        "tokens_per_s": result["tokens_per_s_per_device"],
        "step_times_s": result["step_times_s"],
        "params_m_reported": (result["params"] - pos_table) / 1e6,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--nanogpt", type=Path, help="a karpathy/nanoGPT checkout (its train.py and model.py)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every side")
    parser.add_argument("--steps", type=int, default=60, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both sides")
    parser.add_argument("--zero", type=int, default=0, help="our ZeRO stage (0: plain data parallelism)")
    parser.add_argument("--data-dir", type=Path, help="a prepared corpus (default: stdlib, --vocab)")
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer size of the default corpus")
    parser.add_argument("--sides", default="nanogpt,llmtrain gpt2,llmtrain llama", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one run")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nanogpt is None:
        return fail("--nanogpt PATH is required: a local karpathy/nanoGPT checkout (nothing is downloaded)")
    checkout = args.nanogpt.expanduser().resolve()
    if not (checkout / "train.py").is_file() or not (checkout / "model.py").is_file():
        return fail(f"--nanogpt {args.nanogpt}: no nanoGPT checkout there (train.py and model.py not found)")
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        return fail("--rounds and --steps must be >= 1, --warmup >= 0")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := [s for s in sides if s != "nanogpt" and s not in OURS]:
        return fail(f"--sides: unknown {unknown}")

    from throughput import prepare_stdlib, prepared_sources

    from llmtrain.data.tokenizer import tokenizer_identity
    from llmtrain.errors import UserError
    from llmtrain.model.config import ModelConfig

    try:
        if args.data_dir is not None:
            data_dir = args.data_dir.resolve()
            prepared_sources(data_dir)  # a clear error if it is not a prepared folder
        else:
            data_dir = prepare_stdlib(args.vocab, BENCH.parent / ".cache" / "bench")
    except UserError as err:  # e.g. a cached corpus from an older tokenizer config: one line, not a traceback
        return fail(str(err))
    vocab = tokenizer_identity(data_dir).vocab_size
    if vocab > 65536:
        return fail(f"{data_dir}: vocab {vocab} does not fit nanoGPT's uint16 train.bin")
    padded = ModelConfig(vocab_size=vocab).padded_vocab  # the default vocab_multiple, as ours use
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="vs_nanogpt_") as tmp:
        work = Path(tmp)
        dataset = nanogpt_dataset(data_dir, work / "dataset", padded)
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for side in order:
                if side == "nanogpt":
                    result = run_nanogpt(checkout, dataset, work, args)
                else:
                    result = run_ours(side, data_dir, work, args)
                results[side].append(result)
                print(f"round {rnd + 1} {side}: {result['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)

    print(
        f"{LAYERS} layers x {WIDTH}, {HEADS} heads, context {CONTEXT}, batch {BATCH}, fp32, CPU, "
        f"{args.threads} thread(s), vocab {vocab} (matmul over {padded}), ZeRO-{args.zero} for llmtrain, "
        f"{args.steps} timed steps after {args.warmup}"
    )
    print(
        f"{'side':<16}{'params M':>9}" + "".join(f"{f'round {r + 1} tok/s':>16}" for r in range(args.rounds))
    )
    for side in sides:
        runs = results[side]
        params = runs[0]["params_m_reported"]
        row = f"{side:<16}{params if params is not None else float('nan'):>9.2f}"
        print(row + "".join(f"{r['tokens_per_s']:>16,.0f}" for r in runs))
    summary = {}
    if "nanogpt" in results:
        base = results["nanogpt"]
        for side in sides:
            if side == "nanogpt":
                continue
            ratios = [ours["tokens_per_s"] / ref["tokens_per_s"] for ours, ref in zip(results[side], base)]
            summary[side] = {"ratio_per_round": ratios, "ratio_median": statistics.median(ratios)}
            print(
                f"{side} / nanogpt: "
                + ", ".join(f"round {i + 1} {r:.3f}" for i, r in enumerate(ratios))
                + f"; median {statistics.median(ratios):.3f}"
            )
    if args.out is not None:
        report = {
            "model": {"layers": LAYERS, "width": WIDTH, "heads": HEADS, "context": CONTEXT, "batch": BATCH},
            "threads": args.threads,
            "vocab": vocab,
            "padded_vocab": padded,
            "zero_stage": args.zero,
            "warmup": args.warmup,
            "steps": args.steps,
            "load_average": os.getloadavg(),
            "runs": results,
            "ratios": summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
