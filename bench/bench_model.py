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
import torch.nn.functional as F

from llmtrain.config import load_config
from llmtrain.model import build_model
from llmtrain.model.flops import flops_per_token, mfu, peak_flops
from llmtrain.model.transformer import document_mask

# The vocabulary each preset is benchmarked with: its published tokenizer's, or our default.
VOCAB = {"tiny": 8192, "gpt2_124m": 50257, "llama2_7b": 32000, "llama3_8b": 128256, "llama_1b": 128256}


def random_doc_ids(batch: int, seq_len: int, mean_doc_len: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) document numbers with boundaries at random places, about seq_len/mean_doc_len documents per row."""
    starts = torch.rand(batch, seq_len, generator=gen) < 1.0 / mean_doc_len
    starts[:, 0] = False
    return starts.cumsum(dim=1).to(torch.int32)


def fwd_bwd_seconds(model, x, y, doc_ids, device: torch.device) -> float:
    """Seconds for one forward+backward step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(x, y, doc_ids).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def build(args, name: str, device: torch.device):
    cfg = load_config([f"model={name}", f"train.seq_len={args.seq_len}"]).model
    cfg.vocab_size = VOCAB.get(name, 32000)
    cfg.doc_mask = True  # forward(doc_ids=None) is then plain causal: one model times both
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
    doc_ids = random_doc_ids(B, T, args.mean_doc_len, gen).to(device)
    return cfg, model, x, y, doc_ids


def bench_preset(
    args, name: str, device: torch.device, peak: float | None, with_doc_mask: bool
) -> list[dict]:
    """Causal (and doc-masked) steps interleaved on the same model and batch, so that load from
    other processes hits both alike."""
    cfg, model, x, y, doc_ids = build(args, name, device)
    variants = {"causal": None, "doc": doc_ids} if with_doc_mask else {"causal": None}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for variant, ids in variants.items():
            seconds = fwd_bwd_seconds(model, x, y, ids, device)
            if i >= args.warmup:
                times[variant].append(seconds)
    tokens = args.batch * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    rows = []
    for variant, ts in times.items():
        tok_s = tokens / statistics.median(ts)
        rows.append(
            {
                "preset": name,
                "mask": variant,
                "params": model.num_params(),
                "tok_s": tok_s,
                "tok_s_lo": tokens / max(ts),
                "tok_s_hi": tokens / min(ts),
                "tflops": tok_s * fpt / 1e12,
                "mfu": mfu(tok_s, fpt, peak),
            }
        )
    return rows


def bench_attention(args, seq_len: int, device: torch.device) -> tuple[float, float]:
    """Median ms of SDPA forward+backward alone, plain causal vs a block-diagonal document mask
    (its construction from doc_ids included), 12 heads of 64, batch args.batch."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 12, seq_len, 64)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    doc_ids = random_doc_ids(args.batch, seq_len, args.mean_doc_len, gen).to(device)
    ms: dict[str, list[float]] = {"causal": [], "doc": []}
    for i in range(args.warmup + args.steps):
        for variant in ms:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            if variant == "causal":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc_ids))
            out.sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                ms[variant].append(1e3 * (time.perf_counter() - start))
            q.grad = k.grad = v.grad = None
    return statistics.median(ms["causal"]), statistics.median(ms["doc"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,gpt2_124m,llama_125m")
    parser.add_argument("--doc-mask-presets", default="tiny,llama_125m", help="also timed with doc_mask=true")
    parser.add_argument(
        "--attention-seq-lens", default="512,1024,2048", help="SDPA-only comparison; '' skips"
    )
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
    doc_presets = set(args.doc_mask_presets.split(","))
    header = f"{'preset':<12} {'mask':<7} {'params':>12} {'tokens/s':>10} {'(min-max)':>17} {'TFLOP/s':>9} {'MFU':>7}"
    print(header)
    print("-" * len(header))
    for preset in [p for p in args.presets.split(",") if p]:
        for r in bench_preset(args, preset, device, peak, preset in doc_presets):
            spread = f"({r['tok_s_lo']:.0f}-{r['tok_s_hi']:.0f})"
            mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(
                f"{r['preset']:<12} {r['mask']:<7} {r['params']:>12,} {r['tok_s']:>10.0f} {spread:>17} "
                f"{r['tflops']:>9.4f} {mfu_s:>7}",
                flush=True,
            )
    if args.attention_seq_lens:
        print(
            f"\nSDPA forward+backward alone, batch {args.batch}, 12 heads x 64, docs of ~{args.mean_doc_len} tokens"
        )
        print(f"{'seq_len':>8} {'causal ms':>10} {'doc ms':>10} {'doc/causal':>11}")
        for seq_len in [int(t) for t in args.attention_seq_lens.split(",")]:
            causal, doc = bench_attention(args, seq_len, device)
            print(f"{seq_len:>8} {causal:>10.2f} {doc:>10.2f} {doc / causal:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
