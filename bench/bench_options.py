"""What each model option costs in forward + backward time, the model alone, on this machine.

The shape of bench/ablate.py (4 layers of width 128, 4 heads, context 256, 16 sequences, vocab 4096,
fp32), one model per variant in one process, timed step by step in interleaved rounds so that a
noisy machine slows every variant alike. Prints the median step time, the fastest step, and the
median over rounds of each variant's time relative to the first variant's in the same round.

    OMP_NUM_THREADS=1 python bench/bench_options.py [--variants gpt2,llama,...] [--rounds 15]

The optimizer and the trainer around the model are not in these figures: bench/ablate.py --speed
times whole training steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from ablate import GPT2, LLAMA, SHAPE  # the ablation's shape and model families: one definition

from llmtrain.config import load_config
from llmtrain.model import build_model

RELU2 = [*LLAMA, "model.activation=relu2", "model.ffn_hidden=512"]
VARIANTS = {
    "gpt2": GPT2,
    "llama": LLAMA,
    "llama_ffn341": [*LLAMA, "model.ffn_hidden=341"],
    "relu2": RELU2,
    "relu2_qk_norm": [*RELU2, "model.qk_norm=true"],
    "relu2_softcap": [*RELU2, "model.logit_softcap=15.0"],
    "relu2_z_loss": [*RELU2, "model.z_loss=1e-4"],
    "modern": [*RELU2, "model.qk_norm=true", "model.logit_softcap=15.0", "model.zero_init_proj=true"],
}
VOCAB = 4096
BATCH, SEQ = 16, 256


def build(overrides: list[str]) -> torch.nn.Module:
    cfg = load_config([*SHAPE, *overrides]).model
    cfg.vocab_size = VOCAB
    torch.manual_seed(0)
    return build_model(cfg).train()


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x, y).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="gpt2,llama,relu2,relu2_qk_norm,relu2_softcap,modern")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"bench_options: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    models = {n: build(VARIANTS[n]) for n in names}
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    for _ in range(args.warmup):
        for model in models.values():
            step_seconds(model, x, y)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else reversed(names):
            times[name].append(step_seconds(models[name], x, y))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds")
    print(f"{'variant':16s} {'median ms':>10s} {'fastest ms':>11s} {'time / ' + names[0]:>16s}")
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], times[names[0]], strict=True))
        med, best = statistics.median(times[name]) * 1e3, min(times[name]) * 1e3
        print(f"{name:16s} {med:10.1f} {best:11.1f} {ratio:16.3f}")


if __name__ == "__main__":
    main()
