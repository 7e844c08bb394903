"""Deterministic, resumable, weighted-mixture loading of token windows from memory-mapped shards.

Windows. Each source's train shards, in file order, form one token stream of N tokens. Window w is
stream[w*T : w*T + T + 1] (T = seq_len): windows overlap by one token, so every token after the
first is a target exactly once per epoch, and windows run across document boundaries. A source has
W = (N - 1) // T windows; the last < T tokens are never used.

Global sample k is a pure function of (seed, mixture, k):
  1. Mixture. Samples come in blocks of MIX_BLOCK = 2**18. Within every block, source s owns a fixed
     number of slots n_s (the weights apportioned by largest remainder), placed by a keyed pseudo-random
     permutation of the block. Sample k is then the j-th sample of its source s, where
     j = block * n_s + (number of s's slots before k in the block): each source reads its own
     sample sequence j = 0, 1, 2, ... in order.
  2. Window. Source s's samples walk epochs: epoch e = j // W visits all W windows once, in an order
     given by a permutation keyed by (seed, source name, e); j % W picks the position in it.
The permutations are keyed Feistel networks with cycle walking over plain uint64 arithmetic, so they
need no tables (any corpus size) and do not depend on numpy's random generators across versions.

A step consumes global samples [start, start + G). Rank r of n owns [start + r*G/n, start + (r+1)*G/n)
and yields it as micro-batches in order. The state is the first sample of the next step, so a resume
on any world size with the same global batch continues the identical sample sequence.
"""

from __future__ import annotations

import json
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmtrain.data.shards import ShardReader, list_shards, shard_dir
from llmtrain.data.tokenizer import tokenizer_identity
from llmtrain.errors import DataError, UserError

if TYPE_CHECKING:
    from llmtrain.config import Config
    from llmtrain.data.config import SourceConfig
    from llmtrain.data.tokenizer import TokenizerIdentity

Batch = dict[str, torch.Tensor]
"""{"tokens": (B, T + 1) int32, "doc_ids": (B, T + 1) int32 (only when the loader was asked for them),
"loss_mask": (B, T + 1) uint8 (only when a source has chat shards: 1 where the token is trained on as
a target; rows of sources without masks are all ones)}"""
TOKEN_DTYPE = np.int32  # half of int64 to read, pin and copy; ids < 2**31 (shards hold uint16/uint32)
MIX_BLOCK = 1 << 18
_OPEN_SHARDS = 64  # memory maps kept open per stream (each holds file descriptors)
_MIX_TAG = 0x4D4958  # keys of the mixing blocks; windows are keyed by a hash of the source name
_M64 = (1 << 64) - 1
_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer over a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _mix_int(x: int) -> int:
    """splitmix64 finalizer on a Python int (same function as `_mix`)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def key_of(*parts: int) -> int:
    """A 64-bit key hashed from integers (seed, purpose tag, block or epoch, ...)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = _mix_int(((h ^ (int(part) & _M64)) + 0x9E3779B97F4A7C15) & _M64)
    return h


def permute(i: np.ndarray, n: int, key: int) -> np.ndarray:
    """Keyed pseudo-random bijection of [0, n), applied elementwise.

    A 4-round Feistel network on the 2**bits >= n values (halves of unequal width where bits is odd;
    each round stays invertible), with cycle walking: a value that lands at or above n is permuted
    again until it falls in range. Since 2**bits < 2n, that takes under two passes on average.
    """
    bits = max(2, (n - 1).bit_length())
    round_keys = [_U64(key_of(key, r)) for r in range(4)]

    def once(x: np.ndarray) -> np.ndarray:
        wl, wr = bits // 2, bits - bits // 2
        left, right = x >> _U64(wr), x & _U64((1 << wr) - 1)
        for rk in round_keys:
            left, right = right, left ^ (_mix(right ^ rk) & _U64((1 << wl) - 1))
            wl, wr = wr, wl
        return (left << _U64(wr)) | right

    out = once(np.asarray(i, dtype=np.int64).astype(_U64))
    bad = np.flatnonzero(out >= _U64(n))
    while bad.size:
        out[bad] = once(out[bad])
        bad = bad[out[bad] >= _U64(n)]
    return out.astype(np.int64)


def _apportion(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to weights (largest remainder, ties by index)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


class _Stream:
    """One source split's shards viewed as a single token stream; reads windows with doc ids."""

    def __init__(self, readers: list[ShardReader]):
        self.readers = [r for r in readers if r.num_tokens > 0]
        lengths = np.array([r.num_tokens for r in self.readers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self.num_bytes = sum(r.num_bytes for r in readers)
        self._open: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        masked = [r.has_mask for r in readers]
        if any(masked) and not all(masked):
            plain = next(r for r in readers if not r.has_mask)
            raise DataError(
                f"{plain.idx_path}: has no loss mask while other shards of its source do (mixed "
                "preparations); delete the source's shard folder and re-run `llmtrain prepare`"
            )
        self.has_mask = bool(masked) and all(masked)

    def _shard(self, a: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._open.get(a)
        if hit is not None:
            self._open.move_to_end(a)
            return hit
        reader = self.readers[a]
        # Plain ndarray views of the maps: slicing them skips np.memmap's per-slice bookkeeping.
        hit = (reader.tokens.view(np.ndarray), np.asarray(reader.doc_offsets).view(np.ndarray))
        self._open[a] = hit
        if len(self._open) > _OPEN_SHARDS:
            old, _ = self._open.popitem(last=False)
            self.readers[old].close()
        return hit

    def read(
        self, starts: np.ndarray, length: int, *, doc_ids: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Windows stream[s : s + length] for each s: tokens (B, length) int32 and, when asked for,
        doc ids int32 (None otherwise: they cost as much as the tokens and only doc_mask reads them)."""
        out = np.empty((len(starts), length), dtype=TOKEN_DTYPE)
        marks = (
            np.zeros((len(starts), length), dtype=np.int32) if doc_ids else None
        )  # 1 where a document starts
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1
        local = starts - self.starts[shard_of]
        inside = local + length <= self.starts[shard_of + 1] - self.starts[shard_of]
        cols = np.arange(length)
        for a in np.unique(shard_of[inside]).tolist():  # the common case, vectorized per shard
            rows = np.flatnonzero(inside & (shard_of == a))
            tokens, offsets = self._shard(a)
            lo = local[rows]
            out[rows] = tokens[lo[:, None] + cols]
            if marks is None:
                continue
            # documents starting strictly inside (lo, lo + length): offsets[first:last] of each row
            first = np.searchsorted(offsets, lo, side="right")
            count = np.searchsorted(offsets, lo + length, side="left") - first
            total = int(count.sum())
            if total:
                run_start = np.repeat(np.cumsum(count) - count, count)
                doc = np.repeat(first, count) + np.arange(total) - run_start
                marks[np.repeat(rows, count), offsets[doc] - np.repeat(lo, count)] = 1
        for row in np.flatnonzero(~inside).tolist():
            self._read_across(
                int(starts[row]), int(shard_of[row]), out[row], None if marks is None else marks[row]
            )
        return out, None if marks is None else np.cumsum(marks, axis=1, dtype=np.int32)

    def read_mask(self, starts: np.ndarray, length: int) -> np.ndarray:
        """The loss mask (B, length) uint8 of the windows `read` returns for the same starts."""
        out = np.empty((len(starts), length), dtype=np.uint8)
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1
        for row, (pos, a) in enumerate(zip(starts.tolist(), shard_of.tolist())):
            col = 0
            while col < length:  # one slice per shard the window touches (usually one)
                mask = self.readers[a].mask
                local = pos - int(self.starts[a])
                take = min(length - col, mask.shape[0] - local)
                out[row, col : col + take] = mask[local : local + take]
                col += take
                pos += take
                a += 1
        return out

    def _read_across(self, pos: int, a: int, out: np.ndarray, marks: np.ndarray | None) -> None:
        """One window that runs over the end of shard `a` into the next ones."""
        col, length = 0, out.shape[0]
        while col < length:
            tokens, offsets = self._shard(a)
            local = pos - int(self.starts[a])
            take = min(length - col, tokens.shape[0] - local)
            out[col : col + take] = tokens[local : local + take]
            if marks is None:
                col += take
                pos += take
                a += 1
                continue
            first, last = np.searchsorted(offsets, (local, local + take), side="right")
            inner = offsets[first:last]
            inner = inner[inner < local + take]  # documents starting strictly inside this piece
            marks[inner - local + col] = 1
            if col:  # a later shard always starts with a new document
                marks[col] = 1
            col += take
            pos += take
            a += 1


def _name(src: Any) -> str:
    return str(src["name"] if isinstance(src, dict) else src.name)


def _weight(src: Any) -> float:
    return float(src["weight"] if isinstance(src, dict) else src.weight)


def _open_split(
    data_dir: Path, name: str, split: str, vocab_size: int | None, tokenizer_hash: str | None
) -> list[ShardReader]:
    folder = shard_dir(data_dir, name)
    if not folder.is_dir():
        raise DataError(f"{folder}: no shards for source {name!r}; run `llmtrain prepare` first")
    return [
        ShardReader(p, vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
        for p in list_shards(data_dir, name, split)
    ]


def _batch(tokens: np.ndarray, doc_ids: np.ndarray | None, loss_mask: np.ndarray | None = None) -> Batch:
    batch = {"tokens": torch.from_numpy(tokens)}
    if doc_ids is not None:
        batch["doc_ids"] = torch.from_numpy(doc_ids)
    if loss_mask is not None:
        batch["loss_mask"] = torch.from_numpy(loss_mask)
    return batch


class TrainLoader:
    """Infinite micro-batches of this rank's slice of each global batch (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | Path,
        sources: Sequence[SourceConfig],
        *,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1234,
        vocab_size: int | None = None,
        tokenizer_hash: str | None = None,
        doc_ids: bool = True,
    ):
        if not sources:
            raise UserError("data.sources: no sources to load")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        # The user-facing check of these is `llmtrain.config.batch_layout`; this guards callers.
        if min(seq_len, micro_batch_size, global_batch_size) <= 0 or global_batch_size % (
            micro_batch_size * world_size
        ):
            raise ValueError(
                f"inconsistent batch: global {global_batch_size}, micro {micro_batch_size}, world {world_size}"
            )
        self.data_dir = Path(data_dir)
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.source_names = [_name(s) for s in sources]
        self.weights = [_weight(s) for s in sources]
        self.vocab_size = vocab_size
        self.doc_ids = doc_ids
        self.block_counts = _apportion(self.weights, MIX_BLOCK)
        if (self.block_counts == 0).any():
            tiny = self.source_names[int(np.argmin(self.block_counts))]
            raise UserError(f"data.sources: weight of {tiny!r} is below 1/{MIX_BLOCK} of the total; raise it")
        self._block_starts = np.concatenate([[0], np.cumsum(self.block_counts)])
        self.streams: list[_Stream] = []
        for name in self.source_names:
            readers = _open_split(self.data_dir, name, "train", vocab_size, tokenizer_hash)
            if not readers:
                raise DataError(
                    f"{shard_dir(self.data_dir, name)}: no complete train shards for source {name!r}; "
                    "run `llmtrain prepare` first"
                )
            stream = _Stream(readers)
            if stream.num_tokens < seq_len + 1:
                raise DataError(
                    f"source {name!r}: {stream.num_tokens} train tokens, fewer than one window of "
                    f"seq_len + 1 = {seq_len + 1} ({shard_dir(self.data_dir, name)})"
                )
            self.streams.append(stream)
        self.windows = np.array([(s.num_tokens - 1) // seq_len for s in self.streams], dtype=np.int64)
        self._name_keys = [zlib.crc32(n.encode()) for n in self.source_names]
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._blocks_lock = threading.Lock()  # a prefetch thread reads batches while the trainer logs
        self._step_start = 0
        self._micro = 0

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of every slot of one mixing block, and its rank among that source's slots."""
        with self._blocks_lock:
            hit = self._blocks.get(block)
        if hit is None:
            slot = permute(np.arange(MIX_BLOCK), MIX_BLOCK, key_of(self.seed, _MIX_TAG, block))
            src = (np.searchsorted(self._block_starts, slot, side="right") - 1).astype(np.int16)
            order = np.argsort(src, kind="stable")
            rank = np.empty(MIX_BLOCK, dtype=np.int32)
            rank[order] = np.arange(MIX_BLOCK) - self._block_starts[src[order]]
            hit = (src, rank)
            with self._blocks_lock:
                self._blocks[block] = hit
                if len(self._blocks) > 3:  # a batch spans at most two blocks (+1: the logging thread)
                    self._blocks.pop(next(iter(self._blocks)))
        return hit

    def sample_sources(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, occurrence j within that source) of each global sample index."""
        ks = np.asarray(ks, dtype=np.int64)
        block, pos = np.divmod(ks, MIX_BLOCK)
        src = np.empty(ks.shape, dtype=np.int64)
        occ = np.empty(ks.shape, dtype=np.int64)
        for b in np.unique(block).tolist():
            sel = block == b
            bsrc, brank = self._block(b)
            src[sel] = bsrc[pos[sel]]
            occ[sel] = b * self.block_counts[src[sel]] + brank[pos[sel]]
        return src, occ

    def window_starts(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source index, first stream token) of the window of each global sample index."""
        src, occ = self.sample_sources(ks)
        epoch, i = np.divmod(occ, self.windows[src])
        starts = np.empty_like(occ)
        for s, e in set(zip(src.tolist(), epoch.tolist())):
            sel = (src == s) & (epoch == e)
            key = key_of(self.seed, self._name_keys[s], e)
            starts[sel] = permute(i[sel], int(self.windows[s]), key) * self.seq_len
        return src, starts

    def read_samples(self, ks: np.ndarray | Sequence[int]) -> Batch:
        """The batch made of the given global samples, in order (any rank can read any sample)."""
        ks = np.asarray(ks, dtype=np.int64)
        src, starts = self.window_starts(ks)
        tokens = np.empty((len(ks), self.seq_len + 1), dtype=TOKEN_DTYPE)
        doc_ids = np.empty((len(ks), self.seq_len + 1), dtype=np.int32) if self.doc_ids else None
        masked = any(stream.has_mask for stream in self.streams)
        loss_mask = np.ones((len(ks), self.seq_len + 1), dtype=np.uint8) if masked else None
        for s in np.unique(src).tolist():
            sel = np.flatnonzero(src == s)
            tokens[sel], ids = self.streams[s].read(starts[sel], self.seq_len + 1, doc_ids=self.doc_ids)
            if doc_ids is not None:
                doc_ids[sel] = ids
            if loss_mask is not None and self.streams[s].has_mask:
                loss_mask[sel] = self.streams[s].read_mask(starts[sel], self.seq_len + 1)
            # With data.verify=size/off nothing checked the ids; an id past the embedding table would
            # end in an index error deep inside the model (on GPU, a device assert). A max over one
            # micro-batch on the host is cheap.
            if self.vocab_size is not None and tokens[sel].max(initial=0) >= self.vocab_size:
                name = self.source_names[s]
                raise DataError(
                    f"{shard_dir(self.data_dir, name)}: token id {int(tokens[sel].max())} >= vocab size "
                    f"{self.vocab_size} in a train shard of source {name!r} (corrupt shard; data.verify=full names it)"
                )
        return _batch(tokens, doc_ids, loss_mask)

    def next_batch(self) -> Batch:
        """The next micro-batch of this rank."""
        return self.read_samples(self.advance())

    def advance(self) -> np.ndarray:
        """The global samples of this rank's next micro-batch; moves past them."""
        ks = self.samples_of(self._step_start, self._micro)
        self._micro += 1
        if self._micro == self.grad_accum_steps:
            self._micro = 0
            self._step_start += self.global_batch_size
        return ks

    def samples_of(self, step_start: int, micro: int) -> np.ndarray:
        """The global samples of micro-batch `micro` of the step whose first global sample is `step_start`."""
        per_rank = self.global_batch_size // self.world_size
        first = step_start + self.rank * per_rank + micro * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    @property
    def position(self) -> tuple[int, int]:
        """(first global sample of the current step, micro-batches of it already taken)."""
        return self._step_start, self._micro

    @property
    def next_sample(self) -> int:
        """First global sample of the next step (a partly consumed step counts as consumed)."""
        return self._step_start + (self.global_batch_size if self._micro else 0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_sample": self.next_sample,
            "seed": self.seed,
            "mixture": [[n, w] for n, w in zip(self.source_names, self.weights)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at `next_sample`; the other keys only warn when the seed or mixture changed."""
        if state.get("seed", self.seed) != self.seed:
            warnings.warn(
                f"loader seed changed from {state['seed']} to {self.seed}: the sample order differs",
                stacklevel=2,
            )
        mixture = state.get("mixture")
        current = [[n, w] for n, w in zip(self.source_names, self.weights)]
        if mixture is not None and [list(m) for m in mixture] != current:
            warnings.warn(f"data mixture changed since the checkpoint (was {mixture})", stacklevel=2)
        self._step_start = int(state["next_sample"])
        self._micro = 0

    def samples_per_source(self, upto: int | None = None) -> dict[str, int]:
        """How many of the global samples [0, upto) (default: next_sample) each source supplied."""
        upto = self.next_sample if upto is None else int(upto)
        full, rest = divmod(upto, MIX_BLOCK)
        counts = full * self.block_counts
        if rest:
            counts = counts + np.bincount(self._block(full)[0][:rest], minlength=len(self.streams))
        return dict(zip(self.source_names, counts.tolist()))

    def epochs_per_source(self, upto: int | None = None) -> dict[str, float]:
        """Passes over each source's train windows that the samples [0, upto) amount to."""
        counts = self.samples_per_source(upto)
        return {n: counts[n] / int(w) for n, w in zip(self.source_names, self.windows)}


class ValLoader:
    """Walks each source's validation split once, in stream order, as non-overlapping windows.

    Global batch m of a source holds windows [m*n*B, (m+1)*n*B) (n ranks, B micro-batch size); rank
    r takes its B consecutive windows of each. Every rank gets the same number of batches (needed by
    collective forward passes such as ZeRO-3's), so a tail of fewer than n*B windows is left out.
    """

    def __init__(
        self,
        data_dir: str | Path,
        sources: Sequence[SourceConfig],
        *,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
        vocab_size: int | None = None,
        tokenizer_hash: str | None = None,
        doc_ids: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.data_dir = Path(data_dir)
        self.doc_ids = doc_ids
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size, self.max_batches = rank, world_size, max_batches
        self.source_names = [_name(s) for s in sources]
        self._streams = {
            name: _Stream(_open_split(self.data_dir, name, "val", vocab_size, tokenizer_hash))
            for name in self.source_names
        }

    def _stream(self, source_name: str) -> _Stream:
        if source_name not in self._streams:
            raise KeyError(f"unknown validation source {source_name!r}; have {self.source_names}")
        return self._streams[source_name]

    def num_batches(self, source_name: str) -> int:
        """Micro-batches this rank (and every rank) yields for the source."""
        stream = self._stream(source_name)
        windows = max(0, stream.num_tokens - 1) // self.seq_len
        n = windows // (self.micro_batch_size * self.world_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def batches(self, source_name: str) -> Iterator[Batch]:
        stream = self._stream(source_name)
        step = self.micro_batch_size * self.world_size
        for m in range(self.num_batches(source_name)):
            first = m * step + self.rank * self.micro_batch_size
            starts = np.arange(first, first + self.micro_batch_size, dtype=np.int64) * self.seq_len
            mask = stream.read_mask(starts, self.seq_len + 1) if stream.has_mask else None
            yield _batch(*stream.read(starts, self.seq_len + 1, doc_ids=self.doc_ids), mask)

    def bytes_per_token(self, source_name: str) -> float | None:
        """UTF-8 bytes of source text per token of the val split, when the shards recorded it."""
        stream = self._stream(source_name)
        if not stream.num_bytes or not stream.num_tokens:
            return None
        return stream.num_bytes / stream.num_tokens


def build_train_loader(
    cfg: Config, rank: int, world_size: int, identity: TokenizerIdentity | None = None
) -> TrainLoader:
    """The run's train loader; `identity` (read once by the caller) defaults to the data folder's."""
    identity = identity or tokenizer_identity(cfg.data_dir)
    loader = TrainLoader(
        cfg.data_dir,
        cfg.data.sources,
        seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size or cfg.train.micro_batch_size * world_size,
        rank=rank,
        world_size=world_size,
        seed=cfg.data.seed,
        vocab_size=identity.vocab_size,
        tokenizer_hash=identity.hash,
        doc_ids=cfg.model.doc_mask,
    )
    _check_chat_sources(cfg, loader)
    return loader


def _check_chat_sources(cfg: Config, loader: TrainLoader) -> None:
    """Chat sources need a tokenizer with the template's tokens and shards with loss masks; else
    one line saying so, at start (not a model trained on the prompts)."""
    chat = [i for i, src in enumerate(cfg.data.sources) if src.format == "chat"]
    if not chat:
        return
    from llmtrain.data.chat_template import check_chat_tokenizer
    from llmtrain.data.tokenizer import load_tokenizer

    names = ", ".join(repr(loader.source_names[i]) for i in chat)
    tok = load_tokenizer(cfg.data_dir)
    check_chat_tokenizer(tok, f"{tok.path} (chat source {names})")
    for i in chat:
        if not loader.streams[i].has_mask:
            name = loader.source_names[i]
            raise DataError(
                f"{shard_dir(cfg.data_dir, name)}: source {name!r} is format chat but its shards have no "
                "loss mask (prepared as another format?); delete the folder and re-run `llmtrain prepare`"
            )


def build_val_loader(
    cfg: Config, rank: int, world_size: int, identity: TokenizerIdentity | None = None
) -> ValLoader:
    identity = identity or tokenizer_identity(cfg.data_dir)
    return ValLoader(
        cfg.data_dir,
        cfg.data.sources,
        seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=rank,
        world_size=world_size,
        max_batches=cfg.train.val_batches,
        vocab_size=identity.vocab_size,
        tokenizer_hash=identity.hash,
        doc_ids=cfg.model.doc_mask,
    )
