"""The process group: joining it (under a launcher or alone), leaving it, and seeding the ranks.

A stalled or dead rank must not hang the job forever: every collective waits at most
`train.collective_timeout_s`, after which the waiting ranks fail with a message naming what they
were doing (the trainer names its phase in that error).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import random
import socket
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# Set once this process made its own world of one (so the env we wrote is not mistaken for a launcher's).
_SELF_WORLD = False


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    launched: bool
    """True when a launcher set RANK etc.; False for a plain process that made its own world of one."""


def has_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively: x86 AVX-512 BF16 or AMX-BF16, Arm's BF16 extension.

    Without it torch emulates bf16 matmuls through fp32 conversions: measured ~35x slower than fp32
    (0.9 against 31 GFLOP/s, one thread of an AMD EPYC without AVX-512 BF16).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False  # not Linux: no cheap way to tell; fp32 is never the slow choice
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def resolve_precision(requested: str) -> tuple[str, str]:
    """(precision, why) for `train.precision`: `auto` follows the device; the others stay as given."""
    if requested != "auto":
        return requested, "as set"
    if has_gpu():
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU has no bf16; fp16 with dynamic loss scaling"
    if cpu_has_native_bf16():
        return "bf16", "auto: this CPU computes bf16 natively"
    return "fp32", "auto: this CPU has no native bf16 (AVX-512 BF16 / AMX), where bf16 runs ~35x slower"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(*, timeout_s: float = 600.0, clear_stale_locks: bool = True) -> DistInfo:
    """Join (or create) the process group: under a launcher from its env, alone as rank 0 of 1.

    A plain `llmtrain train` without the launcher gets the env a launcher would have set, on a free
    port, so DeepSpeed sees the same world either way.
    """
    if not has_gpu():
        # Before the first deepspeed import: picks the CPU accelerator without probing for CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    global _SELF_WORLD
    launched = "RANK" in os.environ and not _SELF_WORLD
    if not launched:
        _SELF_WORLD = True
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    from llmtrain.distributed import extensions, shm

    # A lock left by a killed build would make the op build below wait forever, in silence.
    extensions.check_build_locks(clear=clear_stale_locks)
    if not has_gpu() and os.environ.get("LOCAL_RANK", "0") == "0":
        shm.clear_stale_segments()  # RAM that killed CPU jobs left in /dev/shm
    import deepspeed
    import torch.distributed as dist

    quiet = not os.environ.get("LLMTRAIN_DEBUG")
    if quiet:
        # DeepSpeed's INFO lines (configs, timers) and torch's deprecation notices about the
        # collectives DeepSpeed calls drown the progress output; LLMTRAIN_DEBUG=1 shows them.
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if has_gpu():
        # Before the process group: NCCL binds each rank to the current device.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # On CPU ranks DeepSpeed prints "... shm_comm_op built successfully" on stdout from every rank.
        # Only CPU ranks build an op here (DeepSpeed's shared-memory communication op): say so.
        notice = extensions.building_notice() if not has_gpu() else contextlib.nullcontext()
        silence = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
        with silence, notice:
            deepspeed.init_distributed(
                dist_backend="nccl" if has_gpu() else "gloo",
                verbose=False,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        if not has_gpu():
            # DeepSpeed never unlinks its shared-memory allreduce segments (69 MB per rank per job).
            shm.release_own_segment(dist.get_rank(), dist.get_world_size())
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, launched=launched)


def shutdown() -> None:
    """Leave the process group (at the end of a launched run; a plain process keeps its world of one
    so that a second run in the same interpreter, as in tests, joins it again)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and all GPUs) with one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Per-rank seed for dropout and the like: ranks must not draw the same noise."""
    return seed + 1_000_003 * rank
