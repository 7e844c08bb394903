"""The token shard format: a flat token file plus an index, written atomically.

`<prefix>.bin`  little-endian token ids, uint16 when the vocabulary fits, else uint32, documents
                back to back (each already ends with its EOS).
`<prefix>.mask.bin`  only in shards of chat data (format version 2): one uint8 per token, 1 where
                the token is trained on as a target (assistant text), 0 elsewhere (prompt, headers).
`<prefix>.idx`  | 8 bytes magic | uint32 format version | uint32 header length H |
                | H bytes JSON header, space-padded so the offsets start 8-byte aligned |
                | int64 document offsets (num_docs + 1 values, 0 ... num_tokens) |
The JSON header holds dtype, vocab size, tokenizer hash, token / document / source-byte counts and
CRC32 checksums of the token bytes and of the offsets (and of the mask, when there is one). It has
no timestamps or paths, so the same tokens always give byte-identical files. Shards without a mask
are version 1, exactly as before masks existed; a shard with a mask is version 2, so a reader that
predates masks refuses it instead of training on the prompt tokens.

All files are written under temporary names and renamed into place, the `.bin` (and `.mask.bin`)
first and the `.idx` last: a shard is complete exactly when its `.idx` exists.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from llmtrain.errors import DataError

MAGIC = b"LLMTSHRD"
VERSION = 1
MASK_VERSION = 2
"""Format version of a shard with a loss mask; readers accept both."""
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_FLUSH_BYTES = 8 << 20
_CHUNK_TOKENS = 16 << 20


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32 (always little-endian)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


def mask_path(prefix: str | Path) -> Path:
    """`<prefix>.mask.bin`: the loss mask of a chat shard."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".mask.bin")


def _crc(data, crc: int = 0) -> int:
    return zlib.crc32(memoryview(data).cast("B"), crc)


class ShardWriter:
    """Appends documents to one shard; `close()` publishes it, `abort()` leaves nothing complete.

    Used as a context manager: a clean exit closes, an exception aborts. With `with_mask`, every
    document comes with its per-token loss mask (see the module docstring).
    """

    def __init__(self, prefix: str | Path, vocab_size: int, tokenizer_hash: str, *, with_mask: bool = False):
        self.prefix = Path(prefix)
        self.vocab_size = int(vocab_size)
        self.tokenizer_hash = str(tokenizer_hash)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.bin_path, self.idx_path = _paths(self.prefix)
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        # An older complete shard under this name stops counting the moment we start replacing it.
        self.idx_path.unlink(missing_ok=True)
        self._file = open(self._bin_tmp, "wb")  # noqa: SIM115 (closed in close/abort)
        self.with_mask = with_mask
        self.mask_path = mask_path(self.prefix)
        self._mask_tmp = self.mask_path.with_name(self.mask_path.name + ".tmp")
        self._mask_file = open(self._mask_tmp, "wb") if with_mask else None  # noqa: SIM115
        self._mask_pending: list[bytes] = []
        self._mask_crc = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._offsets: list[int] = [0]
        self._crc = 0
        self.num_tokens = 0
        self.num_bytes = 0
        self._closed = False

    @property
    def num_docs(self) -> int:
        return len(self._offsets) - 1

    def add_document(self, tokens: np.ndarray | list[int], num_bytes: int = 0, mask=None) -> None:
        """Append one document (tokens already end with EOS). `num_bytes`: UTF-8 bytes of its text,
        summed into the index so evaluation can report bits per byte. `mask` (with_mask writers
        only): 1 per trained token, 0 per other, as long as `tokens`. Empty documents are skipped."""
        if self._closed:
            raise RuntimeError(f"{self.prefix}: shard writer already closed")
        arr = np.asarray(tokens)
        if (mask is not None) != self.with_mask:
            raise ValueError(f"{self.prefix}: a mask is {'required' if self.with_mask else 'not expected'}")
        self.num_bytes += int(num_bytes)
        if arr.size == 0:
            return
        if mask is not None:
            flags = np.asarray(mask).astype(np.uint8)
            if flags.shape != arr.shape or int(flags.max(initial=0)) > 1:
                raise ValueError(f"{self.prefix}: the mask must be 0/1 flags, one per token")
            data = flags.tobytes()
            self._mask_crc = _crc(data, self._mask_crc)
            self._mask_pending.append(data)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(
                f"{self.bin_path}: a document must be a 1-D integer array, got {arr.dtype} {arr.shape}"
            )
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise DataError(
                f"{self.bin_path}: token id {hi if hi >= self.vocab_size else lo} outside vocabulary "
                f"[0, {self.vocab_size})"
            )
        data = arr.astype(self.dtype, copy=False).tobytes()
        self._crc = _crc(data, self._crc)
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.num_tokens += arr.size
        self._offsets.append(self.num_tokens)
        if self._pending_bytes >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        self._file.write(b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0
        if self._mask_file is not None:
            self._mask_file.write(b"".join(self._mask_pending))
            self._mask_pending.clear()

    def close(self) -> None:
        """Flush and fsync the tokens, rename `.bin` into place, then write and rename the `.idx`."""
        if self._closed:
            return
        try:
            self._flush()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self._mask_file is not None:
                self._mask_file.flush()
                os.fsync(self._mask_file.fileno())
                self._mask_file.close()
            offsets = np.asarray(self._offsets, dtype="<i8")
            header = {
                "checksum": _checksum_str(self._crc),
                "dtype": self.dtype.name,
                "num_bytes": self.num_bytes,
                "num_docs": self.num_docs,
                "num_tokens": self.num_tokens,
                "offsets_checksum": _checksum_str(_crc(offsets)),
                "tokenizer_hash": self.tokenizer_hash,
                "vocab_size": self.vocab_size,
            }
            if self.with_mask:
                header["mask_checksum"] = _checksum_str(self._mask_crc)
            os.replace(self._bin_tmp, self.bin_path)
            if self.with_mask:
                os.replace(self._mask_tmp, self.mask_path)
            with open(self._idx_tmp, "wb") as f:
                f.write(_encode_header(header))
                f.write(offsets.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._idx_tmp, self.idx_path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far; no file remains under this prefix.

        The `.bin` goes too: without its `.idx` it is either an older shard's tokens or ours renamed
        just before a failure, and would otherwise lie there unlisted until overwritten.
        """
        self._closed = True
        self._pending.clear()
        self._mask_pending.clear()
        for f in (self._file, self._mask_file):
            if f is not None and not f.closed:
                f.close()
        for path in (self._idx_tmp, self.idx_path, self._bin_tmp, self.bin_path):
            path.unlink(missing_ok=True)
        for path in (self._mask_tmp, self.mask_path):
            path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _encode_header(header: dict) -> bytes:
    """The index's prefix and JSON header; the version says whether the shard has a mask."""
    version = MASK_VERSION if "mask_checksum" in header else VERSION
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body += b" " * (-(_PREFIX.size + len(body)) % 8)
    return _PREFIX.pack(MAGIC, version, len(body)) + body


class ShardReader:
    """Opens one complete shard and checks its index against the file and the expected tokenizer.

    Construction reads only the index header (cheap for thousands of shards); the tokens and offsets
    are memory-mapped on first use and can be dropped again with `close()`.
    """

    def __init__(
        self, prefix: str | Path, *, vocab_size: int | None = None, tokenizer_hash: str | None = None
    ):
        self.prefix = Path(prefix)
        self.bin_path, self.idx_path = _paths(self.prefix)
        self._tokens: np.memmap | None = None
        self._offsets: np.ndarray | None = None
        self._mask: np.memmap | None = None
        self.mask_path = mask_path(self.prefix)
        head = self._read_header()
        name = self.idx_path
        try:
            self.vocab_size = int(head["vocab_size"])
            self.tokenizer_hash = str(head["tokenizer_hash"])
            self.num_tokens = int(head["num_tokens"])
            self.num_docs = int(head["num_docs"])
            self.num_bytes = int(head.get("num_bytes", 0))
            self.checksum = str(head["checksum"])
            self.offsets_checksum = str(head["offsets_checksum"])
            dtype_name = str(head["dtype"])
            self.mask_checksum = str(head["mask_checksum"]) if self.version == MASK_VERSION else None
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{name}: malformed shard index header ({type(err).__name__}: {err})") from None
        if self.vocab_size <= 0 or self.num_tokens < 0 or self.num_docs < 0:
            raise DataError(f"{name}: malformed shard index header (negative count)")
        self.dtype = dtype_for_vocab(self.vocab_size)
        if dtype_name != self.dtype.name:
            raise DataError(
                f"{name}: dtype {dtype_name} does not match vocab size {self.vocab_size} (expected {self.dtype.name})"
            )
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise DataError(
                f"{name}: shard vocab size {self.vocab_size} does not match the tokenizer's {vocab_size}; "
                "re-run `llmtrain prepare` for this tokenizer"
            )
        if tokenizer_hash is not None and tokenizer_hash != self.tokenizer_hash:
            raise DataError(
                f"{name}: shard was written by tokenizer {self.tokenizer_hash[:16]}, not the current "
                f"{tokenizer_hash[:16]}; re-run `llmtrain prepare` for this tokenizer"
            )
        expect_idx = self._offsets_start + 8 * (self.num_docs + 1)
        if self._idx_size != expect_idx:
            raise DataError(
                f"{name}: index is {self._idx_size} bytes, expected {expect_idx} (truncated or corrupt)"
            )
        try:
            bin_size = self.bin_path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{self.bin_path}: token file missing (its index exists)") from None
        expect_bin = self.num_tokens * self.dtype.itemsize
        if bin_size != expect_bin:
            what = "truncated" if bin_size < expect_bin else "longer than its index says"
            raise DataError(f"{self.bin_path}: {bin_size} bytes, expected {expect_bin} ({what})")
        if self.has_mask:
            try:
                mask_size = self.mask_path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{self.mask_path}: loss mask missing (its index lists one)") from None
            if mask_size != self.num_tokens:
                what = "truncated" if mask_size < self.num_tokens else "longer than its index says"
                raise DataError(f"{self.mask_path}: {mask_size} bytes, expected {self.num_tokens} ({what})")

    @property
    def has_mask(self) -> bool:
        """Whether the shard carries a loss mask (chat data)."""
        return self.mask_checksum is not None

    def _read_header(self) -> dict:
        name = self.idx_path
        try:
            with open(name, "rb") as f:
                raw = f.read(_PREFIX.size)
                if len(raw) < _PREFIX.size:
                    raise DataError(f"{name}: too short to be a shard index")
                magic, version, length = _PREFIX.unpack(raw)
                if magic != MAGIC:
                    raise DataError(f"{name}: not a shard index (bad magic {magic!r})")
                if version not in (VERSION, MASK_VERSION):
                    raise DataError(
                        f"{name}: unsupported shard format version {version} "
                        f"(this llmtrain reads {VERSION} and {MASK_VERSION})"
                    )
                self.version = version
                body = f.read(length)
                self._idx_size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise DataError(f"{name}: shard index not found") from None
        if len(body) != length:
            raise DataError(f"{name}: header truncated")
        self._offsets_start = _PREFIX.size + length
        try:
            head = json.loads(body.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(f"{name}: malformed shard index header (not JSON)") from None
        if not isinstance(head, dict):
            raise DataError(f"{name}: malformed shard index header (not an object)")
        return head

    @property
    def tokens(self) -> np.memmap:
        """All tokens, memory-mapped read-only (nothing is read until sliced)."""
        if self._tokens is None:
            if self.num_tokens == 0:  # mmap refuses empty files
                self._tokens = np.zeros(0, dtype=self.dtype).view(np.memmap)
            else:
                self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 start of every document, plus num_tokens at the end (memory-mapped from the index)."""
        if self._offsets is None:
            offsets = np.memmap(
                self.idx_path, dtype="<i8", mode="r", offset=self._offsets_start, shape=(self.num_docs + 1,)
            )
            if offsets[0] != 0 or offsets[-1] != self.num_tokens:
                raise DataError(
                    f"{self.idx_path}: document offsets run {offsets[0]}..{offsets[-1]}, "
                    f"expected 0..{self.num_tokens} (corrupt index)"
                )
            self._offsets = offsets
        return self._offsets

    @property
    def mask(self) -> np.memmap:
        """uint8 loss mask per token, memory-mapped read-only (only when `has_mask`)."""
        if not self.has_mask:
            raise DataError(f"{self.idx_path}: shard has no loss mask")
        if self._mask is None:
            if self.num_tokens == 0:
                self._mask = np.zeros(0, dtype=np.uint8).view(np.memmap)
            else:
                self._mask = np.memmap(self.mask_path, dtype=np.uint8, mode="r", shape=(self.num_tokens,))
        return self._mask

    def close(self) -> None:
        """Unmap the files (they are mapped again on the next access)."""
        self._tokens = None
        self._offsets = None
        self._mask = None

    def verify(self) -> None:
        """Full check: token and offset checksums, offsets increasing, every id below vocab_size."""
        offsets = self.doc_offsets
        if _checksum_str(_crc(np.ascontiguousarray(offsets))) != self.offsets_checksum:
            raise DataError(f"{self.idx_path}: document offsets checksum mismatch (corrupt index)")
        if offsets.size > 1 and not bool(np.all(np.diff(offsets) > 0)):
            raise DataError(f"{self.idx_path}: document offsets are not increasing (corrupt index)")
        tokens = self.tokens
        crc, top = 0, -1
        for start in range(0, self.num_tokens, _CHUNK_TOKENS):
            chunk = np.asarray(tokens[start : start + _CHUNK_TOKENS])
            crc = _crc(chunk, crc)
            top = max(top, int(chunk.max()))
        if _checksum_str(crc) != self.checksum:
            raise DataError(f"{self.bin_path}: token checksum mismatch (file corrupt or modified)")
        if top >= self.vocab_size:
            raise DataError(f"{self.bin_path}: token id {top} >= vocab size {self.vocab_size}")
        if self.has_mask:
            crc, top = 0, 0
            for start in range(0, self.num_tokens, _CHUNK_TOKENS):
                chunk = np.asarray(self.mask[start : start + _CHUNK_TOKENS])
                crc = _crc(chunk, crc)
                top = max(top, int(chunk.max(initial=0)))
            if _checksum_str(crc) != self.mask_checksum:
                raise DataError(f"{self.mask_path}: loss mask checksum mismatch (file corrupt or modified)")
            if top > 1:
                raise DataError(f"{self.mask_path}: loss mask value {top} is not 0 or 1 (corrupt)")

    def __repr__(self) -> str:
        return f"ShardReader({str(self.prefix)!r}, tokens={self.num_tokens}, docs={self.num_docs})"


def _checksum_str(crc: int) -> str:
    return f"crc32:{crc:08x}"


def shard_dir(data_dir: str | Path, source: str) -> Path:
    """Folder holding one source's shards."""
    return Path(data_dir) / "shards" / source


def shard_prefix(data_dir: str | Path, source: str, split: str, index: int) -> Path:
    """`<data_dir>/shards/<source>/<split>_<NNNNN>` (no suffix)."""
    return shard_dir(data_dir, source) / f"{split}_{index:05d}"


def list_shards(data_dir: str | Path, source: str, split: str) -> list[Path]:
    """Sorted prefixes of the complete shards (those whose `.idx` exists) of one source and split."""
    folder = shard_dir(data_dir, source)
    if not folder.is_dir():
        return []
    return sorted(p.with_suffix("") for p in folder.glob(f"{split}_*.idx") if p.is_file())
