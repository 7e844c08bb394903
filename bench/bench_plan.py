"""`llmtrain plan` against the memory that real training steps take on CPU ranks.

Each case starts 1 or 2 CPU ranks (gloo, DeepSpeed's CPU accelerator) that build the model and the
DeepSpeed engine through llmtrain's own backend and run a few steps on random tokens, fp32. A CPU has
no allocator counter, so every rank reads its resident memory from /proc/self/status and resets the
high-water mark between phases (`5 > /proc/self/clear_refs`); glibc's mmap threshold is fixed
(MALLOC_MMAP_THRESHOLD_) so that a freed tensor leaves the resident set at once and the resident set
follows the live bytes, as the CUDA allocator's counter would (`--default-malloc` shows the
difference). Measured per rank, over the baseline after imports, the process group, a warm-up
all-reduce and a throwaway engine (communication buffers and code, which a GPU plan puts in its fixed
allowance), with the steps' phases told apart by resetting the high-water mark:

    step             peak of the optimizer step: model states, no activations
    activations      peak from the forward pass to the first parameter gradient (the head's backward
                     done), over the resident memory before the step, less that gradient and a tied
                     embedding's (counted in the states); under ZeRO-3 it also holds the gathered weights
    end of backward  peak from the first gradient to the end of the backward: gradients, buckets,
                     DeepSpeed's reduction copies, what is left of the activations
    total            peak of every phase of every step, first one included

set against the plan's terms for the same config (model states, DeepSpeed buffers, activations),
without the CUDA allowance. `--activations` instead checks the activation formula alone in one
process without DeepSpeed, fp32 and bf16. Usage: `OMP_NUM_THREADS=1 python bench/bench_plan.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 8192  # the default tokenizer's size

# name -> (overrides, ranks); fp32 everywhere (CPU ranks), llmtrain's debug=cpu style. mini's
# gradient buckets are smaller than the model so that, as on a GPU, every byte of them is in use.
SMALL = ["model=mini", "train.seq_len=256", "train.micro_batch_size=8", "+bucket=1000000"]
STATES = ["model=llama_125m", "train.seq_len=64", "train.micro_batch_size=1", "+bucket=20000000"]
CASES: dict[str, tuple[list[str], int]] = {
    "mini b8x256 zero1 1 rank": ([*SMALL, "deepspeed.zero_stage=1"], 1),
    "mini b8x256 zero1 2 ranks": ([*SMALL, "deepspeed.zero_stage=1"], 2),
    "mini b8x256 zero1 ckpt 2 ranks": (
        [*SMALL, "deepspeed.zero_stage=1", "model.activation_checkpointing=true"],
        2,
    ),
    "125m b1x64 zero0 1 rank": ([*STATES, "deepspeed.zero_stage=0"], 1),
    "125m b1x64 zero1 2 ranks": ([*STATES, "deepspeed.zero_stage=1"], 2),
    "125m b1x64 zero2 2 ranks": ([*STATES, "deepspeed.zero_stage=2"], 2),
    "125m b1x64 zero3 2 ranks": ([*STATES, "deepspeed.zero_stage=3"], 2),
}
STEPS = 4


def compose(overrides: list[str], world_size: int):
    """The config both the ranks and the plan use.

    ZeRO 1-3 run the GPU code path (contiguous gradient buckets, overlap_comm) with the case's
    `+bucket` elements per bucket: a CPU counts only the pages a tensor has touched, and DeepSpeed's
    default 5e8-element bucket is never filled by these models.
    """
    from llmtrain.config import load_config

    bucket = next(int(o.split("=")[1]) for o in overrides if o.startswith("+bucket="))
    overrides = [o for o in overrides if not o.startswith("+bucket=")]
    cfg = load_config(
        [*overrides, "train.precision=fp32", f"model.vocab_size={VOCAB}", f"plan.world_size={world_size}"]
    )
    if cfg.deepspeed.zero_stage > 0:
        zero = {"contiguous_gradients": True, "overlap_comm": True, "reduce_bucket_size": bucket}
        cfg.deepspeed.config = {"zero_optimization": zero}
    return cfg


# ------------------------------------------------------------------------------------ one rank


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _train_steps(backend, tokens, steps: int, marks: list[int | None]) -> list[dict]:
    """Run `steps` steps; per step the resident memory before it and the peaks of its phases."""
    out = []
    for _ in range(steps):
        gc.collect()
        marks[0] = None
        _reset_peak()
        before = _status("VmRSS")
        loss = backend(tokens[:, :-1], tokens[:, 1:], None)
        backend.backward(loss)  # the hook below records the peak up to the first parameter gradient
        rest_of_backward = _status("VmHWM")
        del loss
        _reset_peak()
        backend.step()
        step = _status("VmHWM")
        out.append(
            {
                "before": before,
                "activations": marks[0] if marks[0] is not None else rest_of_backward,  # minus the gradient
                "rest_of_backward": rest_of_backward,
                "step": step,
                "after": _status("VmRSS"),
            }
        )
    return out


def _engine(cfg, world: int, device):
    from llmtrain.distributed.backend import DeepSpeedBackend
    from llmtrain.distributed.runtime import seed_everything
    from llmtrain.model import build_model
    from llmtrain.train.optim import param_groups

    seed_everything(cfg.run.seed)
    model = build_model(cfg.model)
    return DeepSpeedBackend(model, param_groups(model, cfg.optim), cfg, world, device)


def worker(overrides: list[str]) -> None:
    import copy

    import torch
    import torch.distributed as dist

    from llmtrain.distributed import runtime

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    cfg = compose(overrides, world)
    info = runtime.init_distributed()
    warm = torch.ones(16 << 20)  # 64 MB through the CPU all-reduce: touches its shared buffers
    dist.all_reduce(warm)
    del warm
    # A throwaway engine over a 1-layer, 8-wide model, stepped once, so that the code DeepSpeed and
    # torch load on first use (extensions, lazily imported modules) is in the baseline, not in the states.
    small = copy.deepcopy(cfg)
    small.model.n_layers, small.model.d_model, small.model.n_heads, small.model.vocab_size = 1, 8, 2, 64
    small.model.n_kv_heads, small.model.ffn_hidden = None, None
    warmup = _engine(small, world, info.device)
    _train_steps(warmup, torch.randint(0, 64, (1, 9)), 1, [None])
    del warmup
    gc.collect()
    baseline = _status("VmRSS")
    backend = _engine(cfg, world, info.device)
    after_init = _status("VmRSS")
    marks: list[int | None] = [None]

    def nbytes(param) -> int:
        return getattr(param, "ds_numel", param.numel()) * param.element_size()

    # The head's backward is done at the first parameter gradient: activations were at their peak,
    # and the only gradients then are this one and a tied embedding's (waiting for the embedding's
    # share); the plan counts both in the model states.
    tied = nbytes(backend.module.lm_head.weight) if cfg.model.tie_embeddings else 0

    def first_gradient(param) -> None:
        if marks[0] is None:
            marks[0] = _status("VmHWM") - nbytes(param) - tied
            _reset_peak()

    for param in backend.module.parameters():
        param.register_post_accumulate_grad_hook(first_gradient)
    gen = torch.Generator().manual_seed(info.rank)
    b, s = cfg.train.micro_batch_size, cfg.train.seq_len
    tokens = torch.randint(0, VOCAB, (b, s + 1), generator=gen)
    steps = _train_steps(backend, tokens, STEPS, marks)
    print(json.dumps({"rank": info.rank, "baseline": baseline, "after_init": after_init, "steps": steps}))
    runtime.shutdown()


# ------------------------------------------------------------------- activations alone, no ranks

# (label, model shape, micro batch, sequence): each term of the activation formula dominant somewhere
SHAPES = [
    ("llama, logits dominate", {}, 4, 256),
    ("llama, layers dominate", {"vocab_size": 512}, 4, 256),
    ("llama GQA 4/2 + doc mask", {"vocab_size": 512, "n_kv_heads": 2, "doc_mask": True}, 4, 256),
    ("gpt2", {"arch": "gpt2", "vocab_size": 1000}, 4, 256),
]


def activation_peaks(precision: str) -> list[tuple[str, bool, int, int]]:
    """(label, checkpointing, measured, planned) for one process's forward + backward of a bare model.

    Gradients are allocated before the step, so the peak over the resident memory before it is the
    activations alone (plus transients of accumulating into them, one weight at a time).
    """
    import torch

    from llmtrain.model.config import ModelConfig
    from llmtrain.model.transformer import Transformer
    from llmtrain.plan import activation_bytes

    torch.set_num_threads(1)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    rows = []
    for label, shape, b, s in SHAPES:
        for ckpt in (False, True):
            base = {"n_layers": 4, "d_model": 256, "n_heads": 4, "vocab_size": 8192, "max_seq_len": s}
            cfg = ModelConfig(**{**base, **shape, "activation_checkpointing": ckpt})
            torch.manual_seed(0)
            model = Transformer(cfg).to(dtype).train()
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            tokens = torch.randint(0, cfg.vocab_size, (b, s + 1))
            doc_ids = (torch.arange(s) // 50).expand(b, s).contiguous()
            peaks = []
            for _ in range(3):  # the first pass allocates once-only things
                gc.collect()
                before = _status("VmRSS")
                _reset_peak()
                model(tokens[:, :-1], tokens[:, 1:], doc_ids).backward()
                peaks.append(_status("VmHWM") - before)
            planned = activation_bytes(cfg, b, s, precision, ckpt).peak
            rows.append((label, ckpt, min(peaks[1:]), planned))
    return rows


def activations_alone(precisions: list[str]) -> None:
    print(
        f"{'activations alone (one process)':<40}{'precision':>10}{'measured MB':>14}{'plan MB':>10}{'plan/measured':>15}"
    )
    for precision in precisions:
        # a fresh process per precision, with the mmap threshold fixed, as for the ranks
        env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
        cmd = [sys.executable, __file__, "--activations-worker", precision]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        for label, ckpt, measured, planned in json.loads(out.strip().splitlines()[-1]):
            name = f"{label}{', checkpointing' if ckpt else ''}"
            print(
                f"{name:<40}{precision:>10}{measured / 1e6:>14.1f}{planned / 1e6:>10.1f}{planned / measured:>15.3f}"
            )


# ---------------------------------------------------------------------------------- the driver


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_case(overrides: list[str], ranks: int, *, default_malloc: bool) -> list[dict]:
    """Start `ranks` worker processes (as a launcher would) and return each rank's measurements."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", LLMTRAIN_DEBUG="")
    env.update(WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # fixed: no dynamic threshold, frees go back at once
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(overrides)],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for r in range(ranks)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"rank failed (rc {proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def measured_terms(rank: dict) -> dict[str, float]:
    """Bytes over the rank's baseline; the first step is left out of the per-term figures (DeepSpeed
    and Adam allocate lazily there) but counts in the total."""
    base, steady = rank["baseline"], rank["steps"][1:]
    phases = ("activations", "rest_of_backward", "step")
    return {
        "states": max(s["step"] for s in steady) - base,
        "activations": max(s["activations"] - s["before"] for s in steady),
        "end_of_backward": max(s["rest_of_backward"] for s in steady) - base,
        "total": max(s[p] for s in rank["steps"] for p in phases) - base,
    }


def planned_terms(overrides: list[str], ranks: int) -> dict[str, float]:
    from llmtrain.plan import GB, make_plan

    plan = make_plan(compose(overrides, ranks))
    terms = {
        "states": plan.model_state_gb_per_gpu * GB,
        "buffers": plan.buffers_gb_per_gpu * GB,
        "activations": plan.activation_gb_per_gpu * GB,
    }
    return {**terms, "total": sum(terms.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="names from CASES")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's mmap threshold dynamic")
    parser.add_argument(
        "--activations", nargs="*", default=None, help="only the one-process activation check: fp32 bf16"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--activations-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker))
        return
    if args.activations_worker is not None:
        print(json.dumps(activation_peaks(args.activations_worker)))
        return
    if args.activations is not None:
        activations_alone(args.activations or ["fp32", "bf16"])
        return
    malloc = "glibc default" if args.default_malloc else "MALLOC_MMAP_THRESHOLD_=65536"
    print(f"fp32 CPU ranks, {STEPS} steps, {args.repeats} repeat(s), {malloc}; MB = 10^6 bytes per rank;")
    print("measured: median [min, max] over ranks and repeats; plan: without the CUDA allowance")
    measured_cols = ("step", "activations", "end of backward", "total")
    plan_cols = ("states", "buffers", "activations", "total")
    print(f"{'case':<32}" + "".join(f"{c:>22}" for c in measured_cols) + "   plan: " + " / ".join(plan_cols))
    for name in args.cases:
        overrides, ranks = CASES[name]
        plan = planned_terms(overrides, ranks)
        runs = [
            measured_terms(rank)
            for _ in range(args.repeats)
            for rank in run_case(overrides, ranks, default_malloc=args.default_malloc)
        ]
        cells = []
        for term in ("states", "activations", "end_of_backward", "total"):
            values = [r[term] / 1e6 for r in runs]
            cells.append(f"{statistics.median(values):.1f} [{min(values):.1f}, {max(values):.1f}]")
        totals = [r["total"] for r in runs]
        ratio = f"{plan['total'] / max(totals):.2f}-{plan['total'] / min(totals):.2f}"
        plan_mb = " / ".join(f"{plan[t] / 1e6:.1f}" for t in plan_cols)
        print(
            f"{name:<32}" + "".join(f"{c:>22}" for c in cells) + f"   {plan_mb}  plan/measured total {ratio}"
        )


if __name__ == "__main__":
    main()
