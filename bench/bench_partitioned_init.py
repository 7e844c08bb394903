"""Peak host memory per rank of building a model for ZeRO-3: whole on every rank, or partitioned.

    deepspeed --num_gpus 2 bench/bench_partitioned_init.py --model llama_350m        # CPU ranks
    deepspeed --num_gpus 2 bench/bench_partitioned_init.py --model llama_350m --eager

Each rank builds the preset the way the trainer does (`deepspeed.partitioned_init` true: zero.Init
with our per-module initialization; false: the whole fp32 model first), then wraps it in the
DeepSpeed engine through llmtrain's backend, and prints its peak resident memory (VmHWM) after the
build and after the engine, and the seconds each took. Run the two modes one after the other,
never at once. fp32 (CPU); no data is read and no step is taken.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def vm_hwm_gb() -> float:
    """Peak resident set of this process so far, GB (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_350m")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--eager", action="store_true", help="build the whole model on every rank first")
    args, _ = parser.parse_known_args()  # the launcher may add --local_rank
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from llmtrain.config import load_config
    from llmtrain.distributed import runtime
    from llmtrain.distributed.backend import DeepSpeedBackend, build_partitioned_model
    from llmtrain.model import build_model
    from llmtrain.train.optim import param_groups

    info = runtime.init_distributed()
    cfg = load_config(
        [
            "debug=cpu",
            f"model={args.model}",
            f"model.vocab_size={args.vocab}",
            "deepspeed.zero_stage=3",
            f"deepspeed.partitioned_init={not args.eager}",
            "train.micro_batch_size=1",
            "train.seq_len=128",
        ]
    )
    base = vm_hwm_gb()
    runtime.seed_everything(cfg.run.seed)
    t0 = time.perf_counter()
    model = build_model(cfg.model) if args.eager else build_partitioned_model(cfg, info.world_size)
    built_s, built_gb = time.perf_counter() - t0, vm_hwm_gb()
    t0 = time.perf_counter()
    DeepSpeedBackend(model, param_groups(model, cfg.optim), cfg, info.world_size, info.device)
    engine_s, engine_gb = time.perf_counter() - t0, vm_hwm_gb()
    print(
        json.dumps(
            {
                "rank": info.rank,
                "world": info.world_size,
                "model": args.model,
                "build": "eager" if args.eager else "partitioned",
                "baseline_peak_gb": round(base, 3),
                "peak_after_build_gb": round(built_gb, 3),
                "peak_after_engine_gb": round(engine_gb, 3),
                "build_s": round(built_s, 2),
                "engine_s": round(engine_s, 2),
            }
        ),
        flush=True,
    )
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
