"""Benchmark the fused kernels (llmtrain.kernels) against PyTorch eager and torch.compile.

On a CUDA device: forward+backward time (median and spread over repetitions, CUDA-synchronized) and
peak allocated memory of RMSNorm, SwiGLU and linear + cross-entropy, in bf16, for each of
eager PyTorch (the reference), torch.compile(reference) and the Triton kernel.

Without a GPU it says so and measures only what a CPU can show honestly: the memory saving of the
chunked linear + cross-entropy over naive logits (peak resident memory of a child process, reset
before each repetition) and its CPU time, next to the analytic logits bytes for real model shapes.

    python bench/bench_kernels.py            # whatever this machine has
    python bench/bench_kernels.py --smoke    # tiny shapes, every code path, for testing the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from llmtrain import kernels as K
from llmtrain.kernels.chunked_ce import MIN_CHUNK_CPU, MIN_CHUNK_CUDA

GIB = 1024**3
MIB = 1024**2


# ----------------------------------------------------------------------------------------------------
# timing and memory helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], None], device: torch.device, warmup: int, reps: int
) -> tuple[float, float, float]:
    """(median, min, max) seconds of fn() over reps, after warmup calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def cuda_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory allocated during fn() above what was allocated before it."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


# ----------------------------------------------------------------------------------------------------
# the three kernels, each as (name, make_inputs, {variant: fn(inputs) -> outputs to backprop})


def _fwd_bwd(out: torch.Tensor, grad: torch.Tensor | None) -> None:
    out.backward(grad)


def kernel_cases(tokens: int, d_model: int, ffn: int, vocab: int, device, dtype):
    """Each case: name, a function making fresh leaf inputs, the eager reference and the fused kernel."""

    def rms_inputs():
        x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(d_model, device=device, dtype=dtype, requires_grad=True)
        return (x, w), torch.randn(tokens, d_model, device=device, dtype=dtype)

    def swiglu_inputs():
        g = torch.randn(tokens, ffn, device=device, dtype=dtype, requires_grad=True)
        u = torch.randn(tokens, ffn, device=device, dtype=dtype, requires_grad=True)
        return (g, u), torch.randn(tokens, ffn, device=device, dtype=dtype)

    def ce_inputs():
        h = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(vocab, d_model, device=device) / d_model**0.5).to(dtype).requires_grad_()
        t = torch.randint(0, vocab, (tokens,), device=device)
        return (h, w, t), None

    return [
        (
            f"rms_norm {tokens}x{d_model}",
            rms_inputs,
            lambda x, w: K.rms_norm_ref(x, w, 1e-5),
            lambda x, w: K.rms_norm(x, w, 1e-5),
        ),
        (f"swiglu {tokens}x{ffn}", swiglu_inputs, K.swiglu_ref, K.swiglu),
        (
            f"linear+CE {tokens}x{d_model}, V={vocab}",
            ce_inputs,
            K.naive_linear_cross_entropy,
            K.fused_linear_cross_entropy,
        ),
    ]


def bench_kernels(
    device: torch.device, dtype: torch.dtype, shape: dict, warmup: int, reps: int, compile_: bool
):
    rows = []
    for name, make, eager, fused in kernel_cases(device=device, dtype=dtype, **shape):
        variants = {"eager": eager}
        if compile_:
            variants["compile"] = torch.compile(eager)
        variants["llmtrain.kernels"] = fused
        for variant, fn in variants.items():
            args, grad = make()

            def step(fn=fn, args=args, grad=grad):
                for a in args:
                    if isinstance(a, torch.Tensor) and a.requires_grad:
                        a.grad = None
                _fwd_bwd(fn(*args), grad)

            med, lo, hi = time_fn(step, device, warmup, reps)
            peak = cuda_peak_bytes(step, device) if device.type == "cuda" else None
            rows.append((name, variant, med, lo, hi, peak))
            del args, grad
    return rows


def print_kernel_table(rows, device_name: str) -> None:
    print(f"\nforward+backward on {device_name} (median [min, max] ms; peak = memory allocated above inputs)")
    print(f"{'kernel':<38} {'variant':<17} {'median ms':>10} {'min':>9} {'max':>9} {'peak MiB':>10}")
    for name, variant, med, lo, hi, peak in rows:
        peak_s = f"{peak / MIB:10.1f}" if peak is not None else f"{'n/a':>10}"
        print(f"{name:<38} {variant:<17} {med * 1e3:10.3f} {lo * 1e3:9.3f} {hi * 1e3:9.3f} {peak_s}")


# ----------------------------------------------------------------------------------------------------
# CPU: chunked cross-entropy memory, measured as peak resident memory of a child process


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child_ce(variant: str, n: int, d: int, v: int, reps: int, threads: int) -> None:
    """Runs in a child: per repetition, resets the RSS high-water mark, runs forward+backward and
    prints the peak above the resident memory before the call, and the time."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) / d**0.5).requires_grad_()
    t = torch.randint(0, v, (n,))
    fn = K.naive_linear_cross_entropy if variant == "naive" else K.fused_linear_cross_entropy
    fn(h, w, t).backward()  # warm-up: allocator and thread pools
    results = []
    for _ in range(reps):
        h.grad = w.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        base = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        fn(h, w, t).backward()
        elapsed = time.perf_counter() - t0
        results.append({"peak_bytes": (_rss_kib("VmHWM") - base) * 1024, "seconds": elapsed})
    print(json.dumps(results))


def measure_ce_cpu(n: int, d: int, v: int, reps: int, threads: int) -> dict[str, list[dict]]:
    out = {}
    for variant in ("naive", "fused"):
        cmd = [sys.executable, __file__, "--child-ce", variant, *map(str, (n, d, v, reps, threads))]
        # A fixed mmap threshold makes glibc map every large tensor freshly and unmap it on free, so
        # resident memory follows live tensors instead of reusing pages kept from the last repetition.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def analytic_logits_bytes(n: int, d: int, v: int, elem: int, min_rows: int) -> tuple[int, int]:
    """(naive, fused) bytes for logits and their gradients, by the formulas in kernels/chunked_ce.py:
    naive N*V*(s + 8) at the forward peak; fused (Triton path) C*V*s + N*D*s + V*D*4 (+ V*D*s when
    s < 4). The PyTorch fallback adds up to two fp32 C*V temporaries."""
    c = K.default_chunk_size(n, d, v, min_rows)
    naive = n * v * (elem + 8)
    fused = c * v * elem + n * d * elem + v * d * 4 + (v * d * elem if elem < 4 else 0)
    return naive, fused


def print_ce_cpu(shapes: list[tuple[int, int, int]], reps: int, threads: int) -> None:
    print(
        f"\nchunked linear+CE vs naive logits, fp32 on CPU, {threads} thread(s), {reps} reps "
        "(peak RSS above the call's start; time of forward+backward)"
    )
    print(
        f"{'N x D, V':<24} {'variant':<7} {'peak MiB med':>12} {'[min, max]':>18} {'ms med':>9} {'[min, max]':>18}"
    )
    for n, d, v in shapes:
        res = measure_ce_cpu(n, d, v, reps, threads)
        for variant, runs in res.items():
            peaks = [r["peak_bytes"] / MIB for r in runs]
            secs = [r["seconds"] * 1e3 for r in runs]
            print(
                f"{f'{n}x{d}, {v}':<24} {variant:<7} {statistics.median(peaks):12.1f} "
                f"{f'[{min(peaks):.1f}, {max(peaks):.1f}]':>18} {statistics.median(secs):9.1f} "
                f"{f'[{min(secs):.1f}, {max(secs):.1f}]':>18}"
            )
        naive_b, fused_b = analytic_logits_bytes(n, d, v, 4, MIN_CHUNK_CPU)
        chunk = K.default_chunk_size(n, d, v, MIN_CHUNK_CPU)
        print(
            f"{'':<24} analytic: naive {naive_b / MIB:.1f} MiB; fused (chunk {chunk}) {fused_b / MIB:.1f} MiB "
            f"with Triton, up to {(fused_b + 2 * chunk * v * 4) / MIB:.1f} MiB on the PyTorch fallback"
        )


def print_analytic(models: list[tuple[str, int, int, int]]) -> None:
    print(
        "\nanalytic logits memory in bf16 with the GPU chunk rule (formulas in kernels/chunked_ce.py; not measured)"
    )
    print(f"{'model, tokens':<34} {'chunk':>6} {'naive GiB':>10} {'fused GiB':>10}")
    for name, n, d, v in models:
        naive_b, fused_b = analytic_logits_bytes(n, d, v, 2, MIN_CHUNK_CUDA)
        print(
            f"{name:<34} {K.default_chunk_size(n, d, v, MIN_CHUNK_CUDA):>6} {naive_b / GIB:10.2f} {fused_b / GIB:10.2f}"
        )


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-ce":
        variant, n, d, v, reps, threads = sys.argv[2], *map(int, sys.argv[3:8])
        _child_ce(variant, n, d, v, reps, threads)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, every code path (also on CPU)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for the CE memory runs (1: stable on a shared box)",
    )
    args = parser.parse_args()

    models = [
        ("gpt2_124m, 8x1024 tokens", 8192, 768, 50304),
        ("llama_1b, 8x2048 tokens", 16384, 2048, 32000),
        ("llama3_8b, 8x2048 tokens", 16384, 4096, 128256),
    ]
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        print(f"device: {name}; triton kernels: {K.available()}")
        if args.smoke:
            shapes = [dict(tokens=512, d_model=256, ffn=688, vocab=4000)]
        else:
            shapes = [
                dict(tokens=8192, d_model=768, ffn=2048, vocab=50304),
                dict(tokens=16384, d_model=4096, ffn=14336, vocab=128256),
            ]
        reps = args.reps or (3 if args.smoke else 20)
        for shape in shapes:
            rows = bench_kernels(
                device, torch.bfloat16, shape, warmup=3, reps=reps, compile_=not args.no_compile
            )
            print_kernel_table(rows, name)
        print_analytic(models)
        return

    print(
        "device: CPU only, no CUDA device here: GPU timings and the Triton-vs-eager comparison are not measured."
    )
    if args.smoke:
        rows = bench_kernels(
            torch.device("cpu"),
            torch.float32,
            dict(tokens=64, d_model=32, ffn=48, vocab=500),
            warmup=3,  # torch.compile compiles on the first calls
            reps=args.reps or 2,
            compile_=not args.no_compile,
        )
        print_kernel_table(rows, "CPU (smoke test of the script, reference path)")
        print_ce_cpu([(64, 32, 500)], reps=args.reps or 2, threads=args.threads)
        return
    print_ce_cpu([(2048, 256, 32000), (2048, 256, 50304)], reps=args.reps or 5, threads=args.threads)
    print_analytic(models)


if __name__ == "__main__":
    main()
