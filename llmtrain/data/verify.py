"""Shard integrity before training: catch a corrupt or mismatched shard before it is trained on.

A shard whose bytes changed after `prepare` (a bad disk, a partial copy, an edit) still opens and
trains without a word; only its checksums tell. Checking a whole corpus on every rank would cost
minutes per terabyte, so the work is split:

    full  every rank opens every shard (header, sizes, vocab, tokenizer hash) and fully verifies
          (token, offset and loss-mask checksums, token ids below the vocab size) a share of about
          1/world_size of the bytes, so 1 TB over 64 ranks costs seconds.
    size  every rank opens every shard, nothing more (reads only the index headers).
    off   no check.

The check runs in a background thread (`start_verification`), overlapping the model build:
zlib.crc32 and numpy's reductions release the GIL. `agree` then makes every rank fail with the same
message, whichever rank saw the bad shard, so no rank trains on while another has stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmtrain.data.config import VERIFY_MODES
from llmtrain.data.shards import ShardReader, list_shards, mask_path
from llmtrain.errors import DataError

__all__ = ["VERIFY_MODES", "agree", "data_fingerprint", "shards_to_verify", "start_verification"]
SPLITS = ("train", "val")


def shards_to_verify(data_dir: str | Path, source_names: Iterable[str]) -> list[Path]:
    """Every complete train and val shard prefix of the sources, sources in the given order.

    The order depends only on the names and the folder listing, so every rank builds the same list
    (the rank split below relies on that).
    """
    prefixes: list[Path] = []
    for name in dict.fromkeys(source_names):  # a source named twice is checked once
        for split in SPLITS:
            prefixes.extend(list_shards(data_dir, name, split))
    return prefixes


def data_fingerprint(data_dir: str | Path, source_names: Iterable[str]) -> dict[str, dict]:
    """{source: {"shards", "tokens", "digest"}} from the shard index headers (names, token counts,
    checksums, tokenizer hashes): cheap, and it changes whenever a shard's content does.

    Saved with each checkpoint, so a resume on shards that were re-prepared, edited or swapped is
    refused instead of silently continuing a different sample sequence.
    """
    out: dict[str, dict] = {}
    data_dir = Path(data_dir)
    for name in dict.fromkeys(source_names):
        digest = hashlib.blake2b(digest_size=16)
        shards = tokens = 0
        for split in SPLITS:
            for prefix in list_shards(data_dir, name, split):
                reader = ShardReader(prefix)
                line = f"{prefix.name}\t{reader.num_tokens}\t{reader.checksum}\t{reader.tokenizer_hash}\n"
                if reader.has_mask:  # chat shards: a changed loss mask is changed training data
                    line = f"{line[:-1]}\t{reader.mask_checksum}\n"
                digest.update(line.encode())
                shards += 1
                tokens += reader.num_tokens
        out[name] = {"shards": shards, "tokens": tokens, "digest": digest.hexdigest()}
    return out


def split_by_size(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Shard indices per rank, balanced by bytes: largest shard first to the least loaded rank.

    Greedy longest-first keeps every rank within one shard of the mean. Ties go to the lower
    index and the lower rank, so the assignment is a pure function of the sizes. Each rank's list
    is in shard order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [(0, rank) for rank in range(world_size)]  # already a heap
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(index)
        heapq.heappush(loads, (load + sizes[index], rank))
    return [sorted(share) for share in shares]


def _bin_size(prefix: Path) -> int:
    """Bytes a full check reads from this shard's token file and loss mask (0 when missing: opening
    it reports that)."""
    size = 0
    for path in (prefix.with_name(prefix.name + ".bin"), mask_path(prefix)):
        with contextlib.suppress(OSError):
            size += path.stat().st_size
    return size


@dataclass(frozen=True)
class VerifyResult:
    """What one rank's check found.

    error           the first failure in shard order (a message naming the file), or None
    bad_shards      prefixes of every shard that failed on this rank, in shard order
    shards_checked  shards this rank checked in its mode (full: its share; size: all)
    bytes_checked   token, offset and mask bytes this rank read and checksummed (0 in size mode)
    seconds         wall time of the check
    """

    error: str | None = None
    bad_shards: tuple[str, ...] = ()
    shards_checked: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0


def _describe(prefix: Path, err: Exception) -> str:
    """A DataError already names its file; anything else (an OSError, a bad mmap) gets the prefix."""
    if isinstance(err, DataError):
        return str(err)
    return f"{prefix}: cannot verify shard ({type(err).__name__}: {err})"


def _check(
    prefixes: Sequence[Path],
    mode: str,
    rank: int,
    world_size: int,
    vocab_size: int | None,
    tokenizer_hash: str | None,
) -> VerifyResult:
    """Run the checks of one rank, collecting failures instead of stopping at the first.

    Going on after a failure costs little and tells the user whether one file is bad or all of them
    (e.g. a tokenizer change).
    """
    t0 = time.perf_counter()
    mine: set[int] = set()
    if mode == "full":
        mine = set(split_by_size([_bin_size(p) for p in prefixes], world_size)[rank])
    errors: list[tuple[str, str]] = []
    checked = checked_bytes = 0
    for index, prefix in enumerate(prefixes):
        try:
            reader = ShardReader(prefix, vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
            if index in mine:
                try:
                    reader.verify()
                finally:
                    reader.close()
                checked_bytes += reader.num_tokens * reader.dtype.itemsize + 8 * (reader.num_docs + 1)
                checked_bytes += reader.num_tokens if reader.has_mask else 0
        except Exception as err:  # noqa: BLE001 (reported through agree(), never raised here)
            errors.append((str(prefix), _describe(prefix, err)))
        if mode == "size" or index in mine:
            checked += 1
    return VerifyResult(
        error=errors[0][1] if errors else None,
        bad_shards=tuple(p for p, _ in errors),
        shards_checked=checked,
        bytes_checked=checked_bytes,
        seconds=time.perf_counter() - t0,
    )


class ShardVerification:
    """A check running in a background thread; `wait()` returns its VerifyResult, never raises."""

    def __init__(self, target) -> None:
        self._target = target
        self._result: VerifyResult | None = None
        self._thread = threading.Thread(target=self._run, name="shard-verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._result = self._target()
        except BaseException as err:  # noqa: BLE001 (a thread's exception would only be printed)
            self._result = VerifyResult(
                error=f"shard verification failed ({type(err).__name__}: {err})",
                seconds=time.perf_counter() - t0,
            )

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> VerifyResult:
        self._thread.join()
        assert self._result is not None
        return self._result


def start_verification(
    prefixes: Sequence[Path],
    *,
    mode: str,
    rank: int = 0,
    world_size: int = 1,
    vocab_size: int | None = None,
    tokenizer_hash: str | None = None,
) -> ShardVerification:
    """Start checking `prefixes` (the same list on every rank) in the background; see the module doc."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"unknown shard verify mode {mode!r}; expected one of {', '.join(VERIFY_MODES)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if mode == "off":
        return ShardVerification(lambda: VerifyResult())
    prefixes = [Path(p) for p in prefixes]
    return ShardVerification(lambda: _check(prefixes, mode, rank, world_size, vocab_size, tokenizer_hash))


def _message(reports: Sequence[tuple[str | None, Sequence[str]]]) -> str | None:
    """The first error by rank order, plus how many other shards failed anywhere.

    In size mode every rank reports the same bad shard, so shards are counted once by prefix.
    """
    first = next((error for error, _ in reports if error is not None), None)
    if first is None:
        return None
    bad = {prefix for _, shards in reports for prefix in shards}
    more = len(bad) - 1
    return f"{first} (and {more} more)" if more > 0 else first


def agree(result: VerifyResult) -> None:
    """Raise the same DataError on every rank if any rank found a bad shard.

    A collective when torch.distributed is initialized: every rank must call it. Without a process
    group it raises this rank's own error.
    """
    import torch.distributed as dist  # lazily: the data package does not need torch otherwise

    report = (result.error, result.bad_shards)
    reports = [report]
    if dist.is_available() and dist.is_initialized():
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, report)
    message = _message(reports)
    if message is not None:
        raise DataError(message)
