"""Forward+backward throughput of model presets, and the cost of document masking.

    python bench/bench_model.py                                   # CPU defaults (small batches)
    python bench/bench_model.py --device cuda --dtype bf16 --presets llama_125m,llama_1b --batch 8 --seq-len 2048

Prints a table: tokens/s (median of timed steps, with min-max spread), achieved TFLOP/s by the
PaLM convention (6*N + 12*L*H*Q*T per token), and MFU where the device's peak is known (GPUs in
llmtrain.model.flops; a CPU has no entry, so MFU prints as n/a).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmtrain.config import load_config
from llmtrain.model import build_model
from llmtrain.model.flops import flops_per_token, mfu, peak_flops

# The vocabulary each preset is benchmarked with: its published tokenizer's, or our default.
VOCAB = {"tiny": 8192, "gpt2_124m": 50257, "llama2_7b": 32000, "llama3_8b": 128256, "llama_1b": 128256}


def random_doc_ids(batch: int, seq_len: int, mean_doc_len: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) document numbers with boundaries at random places, about seq_len/mean_doc_len documents per row."""
    starts = torch.rand(batch, seq_len, generator=gen) < 1.0 / mean_doc_len
    starts[:, 0] = False
    return starts.cumsum(dim=1).to(torch.int32)


def time_steps(model, x, y, doc_ids, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per forward+backward step, after warmup steps."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(x, y, doc_ids)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return times


def bench(args, name: str, doc_mask: bool, device: torch.device, peak: float | None) -> dict:
    cfg = load_config([f"model={name}", f"train.seq_len={args.seq_len}"]).model
    cfg.vocab_size = VOCAB.get(name, 32000)
    cfg.doc_mask = doc_mask
    cfg.compile = args.compile
    cfg.activation_checkpointing = args.activation_checkpointing
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    B, T = args.batch, args.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)
    doc_ids = random_doc_ids(B, T, args.mean_doc_len, gen).to(device) if doc_mask else None
    times = time_steps(model, x, y, doc_ids, args.steps, args.warmup, device)
    med = statistics.median(times)
    fpt = flops_per_token(cfg, T)
    tok_s = B * T / med
    return {
        "preset": name,
        "mask": "doc" if doc_mask else "causal",
        "params": model.num_params(),
        "tok_s": tok_s,
        "tok_s_lo": B * T / max(times),
        "tok_s_hi": B * T / min(times),
        "tflops": tok_s * fpt / 1e12,
        "mfu": mfu(tok_s, fpt, peak),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,gpt2_124m,llama_125m")
    parser.add_argument("--doc-mask-presets", default="tiny,llama_125m", help="also timed with doc_mask=true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--mean-doc-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = peak_flops(name)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
        peak = None
    print(
        f"device: {name}; dtype {args.dtype}; batch {args.batch} x seq {args.seq_len}; torch {torch.__version__}"
    )
    if peak is None:
        print(
            "MFU: n/a (no GPU, or a device without a peak in llmtrain.model.flops; set LLMTRAIN_PEAK_FLOPS)"
        )
    runs = [(p, False) for p in args.presets.split(",") if p]
    runs += [(p, True) for p in args.doc_mask_presets.split(",") if p]
    header = f"{'preset':<12} {'mask':<7} {'params':>12} {'tokens/s':>10} {'(min-max)':>17} {'TFLOP/s':>9} {'MFU':>7}"
    print(header)
    print("-" * len(header))
    for preset, doc_mask in runs:
        r = bench(args, preset, doc_mask, device, peak)
        spread = f"({r['tok_s_lo']:.0f}-{r['tok_s_hi']:.0f})"
        mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{r['preset']:<12} {r['mask']:<7} {r['params']:>12,} {r['tok_s']:>10.0f} {spread:>17} "
            f"{r['tflops']:>9.4f} {mfu_s:>7}",
            flush=True,
        )


if __name__ == "__main__":
    main()
