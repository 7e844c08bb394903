"""The sentencepiece tokenizer: training on a corpus sample, its identity hash, and reuse.

`<data_dir>/tokenizer.model` is the sentencepiece model; `<data_dir>/tokenizer.json` beside it
records the hash, the special ids and the settings it was made with. The sidecar is written last,
so a model without one is an interrupted training and is never reused.

Training keeps text lossless, which matters for code: no Unicode normalization, whitespace kept as
is (runs of spaces become pieces), newlines learned as ordinary characters, digits split, and
bytes as a fallback for characters outside the vocabulary, so decode(encode(text)) == text.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from llmtrain.data.config import TokenizerConfig
from llmtrain.errors import DataError
from llmtrain.io import write_atomic

MODEL_FILE = "tokenizer.model"
SIDECAR_FILE = "tokenizer.json"
_CHUNK_CHARS = 2048  # training "sentences": documents cut at line ends into pieces of about this size
_IDENTITY_FIELDS = (1, 3, 5)  # ModelProto: pieces, normalizer_spec, denormalizer_spec


def model_hash(model_bytes: bytes) -> str:
    """sha256 of the pieces, scores and (de)normalizer of a serialized ModelProto.

    The trainer spec is left out: it embeds the output path and thread count, so byte-for-byte
    different files can hold the very same tokenizer.
    """
    digest = hashlib.sha256()
    for number, raw in _top_level_fields(model_bytes):
        if number in _IDENTITY_FIELDS:
            digest.update(raw)
    return digest.hexdigest()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _top_level_fields(data: bytes) -> Iterable[tuple[int, bytes]]:
    """(field number, raw encoded field) of a protobuf message, without needing its schema."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield key >> 3, data[start:pos]


class Tokenizer:
    """A loaded sentencepiece model; `encode` adds no BOS/EOS (the shard writer appends EOS)."""

    def __init__(self, model_bytes: bytes, path: Path | None = None):
        import sentencepiece as spm

        where = path or "tokenizer"
        try:
            self.hash = model_hash(model_bytes)
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except (ValueError, RuntimeError, OSError) as err:
            raise DataError(f"{where}: not a valid sentencepiece model ({err})") from None
        self.model_bytes = model_bytes
        self.path = path
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: tokenizer model not found") from None
        except OSError as err:
            raise DataError(f"{path}: cannot read tokenizer model ({err.strerror or err})") from None
        return cls(data, path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1) -> list[list[int]]:
        """One list of ids per text; one thread by default (worker processes do the parallelism)."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids) -> str:
        return self._sp.decode(ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def info(self) -> dict:
        """The sidecar's description of this model."""
        return {
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "model_type": _model_type_name(self.model_bytes),
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def _model_type_name(model_bytes: bytes) -> str:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf; optional

        proto = pb.ModelProto()
        proto.ParseFromString(model_bytes)
        return pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
    except Exception:
        return "unknown"


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer of a prepared data folder."""
    path = Path(data_dir) / MODEL_FILE
    if not path.is_file():
        raise DataError(f"{path}: no tokenizer here; run `llmtrain prepare` first (with the same data.dir)")
    return Tokenizer.load(path)


def settings_of(tcfg: TokenizerConfig) -> dict:
    """The config values that determine the tokenizer (compared on reuse)."""
    if tcfg.path:
        return {"path": str(Path(tcfg.path).expanduser().resolve())}
    return {
        "vocab_size": tcfg.vocab_size,
        "model_type": tcfg.model_type,
        "char_budget": tcfg.char_budget,
        "byte_fallback": tcfg.byte_fallback,
        "unk_id": tcfg.unk_id,
        "bos_id": tcfg.bos_id,
        "eos_id": tcfg.eos_id,
        "pad_id": tcfg.pad_id,
        "user_defined_symbols": list(tcfg.user_defined_symbols),
    }


def read_sidecar(data_dir: str | Path) -> dict | None:
    """The sidecar of a data folder (None when there is none); the one reader of tokenizer.json."""
    path = Path(data_dir) / SIDECAR_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable tokenizer sidecar ({err}); delete it to retrain") from None
    if not isinstance(meta, dict) or "hash" not in meta:
        raise DataError(f"{path}: malformed tokenizer sidecar (no hash); delete it to retrain")
    if not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise DataError(f"{path}: malformed tokenizer sidecar (vocab_size); delete it to retrain")
    return meta


@dataclass(frozen=True)
class TokenizerIdentity:
    """What shards and checkpoints are checked against: the vocabulary size and the identity hash."""

    vocab_size: int
    hash: str


def tokenizer_identity(data_dir: str | Path) -> TokenizerIdentity:
    """The identity of a prepared data folder's tokenizer, without loading sentencepiece."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found; run `llmtrain prepare` first")
    meta = read_sidecar(data_dir)
    if meta is None:
        raise DataError(f"{data_dir / SIDECAR_FILE}: tokenizer sidecar not found; run `llmtrain prepare` first")
    return TokenizerIdentity(vocab_size=int(meta["vocab_size"]), hash=str(meta["hash"]))


def _training_sentences(texts: Iterable[str], char_budget: int, counter: list[int]) -> Iterable[str]:
    """Documents cut at line ends into pieces of about _CHUNK_CHARS, newlines kept, up to the budget."""
    total = 0
    for text in texts:
        if total >= char_budget:
            break
        text = text[: char_budget - total]
        total += len(text)
        counter[0] += 1
        counter[1] = total
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            while len(line) > _CHUNK_CHARS:  # very long lines (minified data): hard cut
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                yield line[:_CHUNK_CHARS]
                line = line[_CHUNK_CHARS:]
            if size + len(line) > _CHUNK_CHARS and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def train_tokenizer(tcfg: TokenizerConfig, texts: Iterable[str], out_dir: str | Path) -> Tokenizer:
    """Train a sentencepiece model on `texts` (at most `tcfg.char_budget` characters, in order) and
    save it as `<out_dir>/tokenizer.model` + `tokenizer.json`, atomically (temp folder + rename)."""
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counter = [0, 0]  # documents, characters actually used
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_sentences(texts, tcfg.char_budget, counter)),
            model_writer=writer,
            model_type=tcfg.model_type,
            vocab_size=tcfg.vocab_size,
            byte_fallback=tcfg.byte_fallback,
            character_coverage=0.9995 if tcfg.byte_fallback else 1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=4 * _CHUNK_CHARS + 16,
            input_sentence_size=0,
            unk_id=tcfg.unk_id,
            bos_id=tcfg.bos_id,
            eos_id=tcfg.eos_id,
            pad_id=tcfg.pad_id,
            user_defined_symbols=list(tcfg.user_defined_symbols),
            num_threads=tcfg.threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if "too high" in msg:
            hint = "lower tokenizer.vocab_size, or give it more text (tokenizer.char_budget, a larger corpus)"
        elif "required_chars" in msg:
            hint = "raise tokenizer.vocab_size: the text has more distinct characters than it holds"
        else:
            hint = "check the tokenizer settings"
        raise DataError(f"tokenizer training on {counter[1]:,} characters failed: {msg} ({hint})") from None
    extra = {"trained_docs": counter[0], "trained_chars": counter[1]}
    return _publish(writer.getvalue(), out_dir, settings_of(tcfg), extra)


def _publish(model_bytes: bytes, out_dir: Path, settings: dict, extra: dict) -> Tokenizer:
    """Write the model, then the sidecar, each atomically; the old sidecar goes first, so a crash in
    between leaves a model without a sidecar: an interrupted training, never reused."""
    tok = Tokenizer(model_bytes)
    meta = {**tok.info(), "settings": settings, **extra}
    (out_dir / SIDECAR_FILE).unlink(missing_ok=True)
    write_atomic(out_dir / MODEL_FILE, model_bytes)
    write_atomic(out_dir / SIDECAR_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tok.path = out_dir / MODEL_FILE
    return tok


def get_tokenizer(
    tcfg: TokenizerConfig, data_dir: str | Path, texts: Callable[[], Iterable[str]]
) -> tuple[Tokenizer, str]:
    """(tokenizer, what happened: "reused" | "copied" | "trained").

    Reuses `<data_dir>/tokenizer.model` when its sidecar's settings match the config; refuses a
    mismatch rather than silently retraining under existing shards. `texts()` is only called when
    training is needed.
    """
    data_dir = Path(data_dir)
    meta = read_sidecar(data_dir)
    wanted = settings_of(tcfg)
    given = None
    if tcfg.path:
        try:
            given = Tokenizer.load(Path(tcfg.path).expanduser())
        except DataError as err:
            raise DataError(f"tokenizer.path {err}") from None
        if given.eos_id < 0:
            raise DataError(f"tokenizer.path {tcfg.path}: the model has no EOS piece (eos_id = -1)")
    if meta is not None and (data_dir / MODEL_FILE).is_file():
        side = data_dir / SIDECAR_FILE
        # a given model counts as the same when its pieces are, wherever the file now lives
        if given is not None and meta["hash"] != given.hash:
            raise DataError(
                f"{side}: the tokenizer in {data_dir} (hash {meta['hash'][:12]}) is not the model at "
                f"tokenizer.path {tcfg.path} (hash {given.hash[:12]}); delete {data_dir} (tokenizer and "
                "shards) to rebuild, or point data.dir elsewhere"
            )
        if given is None and meta.get("settings") != wanted:
            raise DataError(
                f"{side}: the tokenizer in {data_dir} was made with {_diff(meta.get('settings'), wanted)}; "
                f"delete {data_dir} (tokenizer and shards) to rebuild, or change the config to match"
            )
        tok = Tokenizer.load(data_dir / MODEL_FILE)
        if tok.hash != meta["hash"]:
            raise DataError(
                f"{data_dir / MODEL_FILE}: does not match the hash in {side} (modified?); delete both to rebuild"
            )
        return tok, "reused"
    data_dir.mkdir(parents=True, exist_ok=True)
    if given is not None:
        return _publish(given.model_bytes, data_dir, wanted, {"copied_from": wanted["path"]}), "copied"
    return train_tokenizer(tcfg, texts(), data_dir), "trained"


def _diff(old: dict | None, new: dict) -> str:
    if not isinstance(old, dict):
        return "unknown settings"
    keys = sorted(set(old) | set(new))
    parts = [f"{k}={old.get(k)!r} (config: {new.get(k)!r})" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(parts) or "the same settings"


# ---- shard preparation workers: this module imports nothing heavy, so spawned workers start fast ----

_WORKER: dict = {}


def init_worker(model_bytes: bytes) -> None:
    """Load the model once per worker process (also called in-process for a single worker)."""
    import sentencepiece as spm

    from llmtrain.data.shards import dtype_for_vocab

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    _WORKER.update(sp=sp, eos=sp.eos_id(), dtype=dtype_for_vocab(sp.get_piece_size()))


def encode_chunk(texts: list[str]):
    """(tokens of all texts back to back, each followed by EOS; tokens per text; UTF-8 bytes per text),
    as numpy arrays: cheap to send between processes."""
    import numpy as np

    sp, eos = _WORKER["sp"], _WORKER["eos"]
    ids = sp.encode(texts, out_type=int, num_threads=1)
    for doc in ids:
        doc.append(eos)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.array(list(chain.from_iterable(ids)), dtype=_WORKER["dtype"])
    nbytes = np.fromiter(
        (len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t in texts),
        dtype=np.int64,
        count=len(texts),
    )
    return flat, lengths, nbytes
