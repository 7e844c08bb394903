"""Round trips and every kind of bad shard: each must fail with one line naming the file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from llmtrain.data import shards
from llmtrain.data.shards import ShardReader, ShardWriter, dtype_for_vocab, list_shards, shard_prefix
from llmtrain.errors import DataError

HASH = "a" * 64


def write_shard(prefix, docs, vocab_size=1000, tokenizer_hash=HASH, num_bytes=0):
    with ShardWriter(prefix, vocab_size, tokenizer_hash) as w:
        for doc in docs:
            w.add_document(doc, num_bytes=num_bytes)
    return prefix


def random_docs(rng, vocab_size, n=20):
    return [rng.integers(0, vocab_size, size=int(rng.integers(1, 300))) for _ in range(n)]


def rewrite_header(prefix, **changes):
    """Re-encode the index header with some fields changed, keeping the offsets."""
    idx = prefix.with_name(prefix.name + ".idx")
    raw = idx.read_bytes()
    _, _, length = struct.unpack("<8sII", raw[:16])
    head = json.loads(raw[16 : 16 + length])
    head.update(changes)
    idx.write_bytes(shards._encode_header(head) + raw[16 + length :])


def test_dtype_for_vocab_boundary():
    assert dtype_for_vocab(65536) == np.dtype("<u2")
    assert dtype_for_vocab(65537) == np.dtype("<u4")


@pytest.mark.parametrize("vocab_size", [1000, 65536, 100_000])
def test_round_trip_tokens_offsets_and_metadata(tmp_path, vocab_size):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, vocab_size)
    prefix = write_shard(tmp_path / "train_00000", docs, vocab_size=vocab_size, num_bytes=7)
    r = ShardReader(prefix, vocab_size=vocab_size, tokenizer_hash=HASH)
    r.verify()
    expected = np.concatenate(docs)
    assert isinstance(r.tokens, np.memmap)
    assert r.tokens.dtype == dtype_for_vocab(vocab_size)
    np.testing.assert_array_equal(r.tokens, expected)
    assert r.num_tokens == expected.size and r.num_docs == len(docs)
    np.testing.assert_array_equal(r.doc_offsets, np.cumsum([0] + [len(d) for d in docs]))
    assert r.num_bytes == 7 * len(docs)
    assert (tmp_path / "train_00000.bin").stat().st_size == expected.size * r.tokens.dtype.itemsize
    if vocab_size > 65536:
        assert int(r.tokens.max()) > 65535  # ids that need 32 bits survive


def test_same_documents_give_byte_identical_files(tmp_path):
    docs = random_docs(np.random.default_rng(1), 1000)
    a = write_shard(tmp_path / "a" / "train_00000", docs)
    b = write_shard(tmp_path / "b" / "train_00000", [list(map(int, d)) for d in docs])
    for suffix in (".bin", ".idx"):
        assert (a.parent / (a.name + suffix)).read_bytes() == (b.parent / (b.name + suffix)).read_bytes()


def test_truncated_bin_is_rejected_naming_the_file(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.arange(100)])
    path = tmp_path / "train_00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train_00000\.bin: 198 bytes, expected 200 \(truncated\)"):
        ShardReader(prefix)


def test_missing_bin_is_rejected(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.arange(10)])
    (tmp_path / "train_00000.bin").unlink()
    with pytest.raises(DataError, match=r"train_00000\.bin: token file missing"):
        ShardReader(prefix)


def test_wrong_magic_is_rejected(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.arange(10)])
    idx = tmp_path / "train_00000.idx"
    idx.write_bytes(b"NOTASHRD" + idx.read_bytes()[8:])
    with pytest.raises(DataError, match=r"train_00000\.idx: not a shard index \(bad magic"):
        ShardReader(prefix)


def test_unsupported_version_is_rejected(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.arange(10)])
    idx = tmp_path / "train_00000.idx"
    raw = idx.read_bytes()
    idx.write_bytes(raw[:8] + struct.pack("<I", 99) + raw[12:])
    with pytest.raises(DataError, match=r"train_00000\.idx: unsupported shard format version 99"):
        ShardReader(prefix)


def test_truncated_index_is_rejected(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.arange(10), np.arange(5)])
    idx = tmp_path / "train_00000.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"train_00000\.idx: index is \d+ bytes, expected \d+"):
        ShardReader(prefix)


def test_dtype_not_matching_vocab_is_rejected(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.arange(10)])
    rewrite_header(prefix, dtype="uint32")
    with pytest.raises(DataError, match=r"train_00000\.idx: dtype uint32 does not match vocab size 1000"):
        ShardReader(prefix)


def test_vocab_and_tokenizer_hash_mismatch_are_rejected(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.arange(10)])
    ShardReader(prefix, vocab_size=1000, tokenizer_hash=HASH)
    with pytest.raises(DataError, match=r"train_00000\.idx: shard vocab size 1000 does not match .* 2000"):
        ShardReader(prefix, vocab_size=2000)
    with pytest.raises(
        DataError, match=r"train_00000\.idx: shard was written by tokenizer aaaa.*not the current bbbb"
    ):
        ShardReader(prefix, tokenizer_hash="b" * 64)


def test_verify_finds_token_id_beyond_vocab(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.array([1, 2, 1500, 3])], vocab_size=2000)
    rewrite_header(prefix, vocab_size=1000)  # same dtype and checksum, smaller vocabulary
    r = ShardReader(prefix)
    with pytest.raises(DataError, match=r"train_00000\.bin: token id 1500 >= vocab size 1000"):
        r.verify()


def test_verify_finds_flipped_token_bytes(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.arange(100)])
    path = tmp_path / "train_00000.bin"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    r = ShardReader(prefix)  # same size: only the checksum notices
    with pytest.raises(DataError, match=r"train_00000\.bin: token checksum mismatch"):
        r.verify()


def test_verify_finds_corrupt_offsets(tmp_path):
    prefix = write_shard(tmp_path / "train_00000", [np.arange(10), np.arange(10), np.arange(10)])
    idx = tmp_path / "train_00000.idx"
    raw = bytearray(idx.read_bytes())
    raw[-16] ^= 1  # second-to-last offset
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_00000\.idx: document offsets checksum mismatch"):
        ShardReader(prefix).verify()


def test_writer_rejects_ids_outside_vocab(tmp_path):
    with ShardWriter(tmp_path / "train_00000", 1000, HASH) as w:
        with pytest.raises(
            DataError, match=r"train_00000\.bin: token id 1000 outside vocabulary \[0, 1000\)"
        ):
            w.add_document([5, 1000])
        with pytest.raises(DataError, match="token id -1 outside"):
            w.add_document(np.array([-1, 3]))
        w.add_document([1, 2])
    assert ShardReader(tmp_path / "train_00000").num_tokens == 2


def test_half_written_shard_is_never_listed(tmp_path):
    prefix = shard_prefix(tmp_path, "web", "train", 0)
    w = ShardWriter(prefix, 1000, HASH)
    w.add_document(np.arange(50))
    w._flush()  # bytes on disk, under the temporary name only
    assert list_shards(tmp_path, "web", "train") == []
    with pytest.raises(DataError, match="shard index not found"):
        ShardReader(prefix)
    w.close()
    assert list_shards(tmp_path, "web", "train") == [prefix]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["train_00000.bin", "train_00000.idx"]


def test_exception_inside_writer_leaves_nothing(tmp_path):
    prefix = shard_prefix(tmp_path, "web", "train", 0)
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(prefix, 1000, HASH) as w:
        w.add_document(np.arange(50))
        raise RuntimeError("boom")
    assert list(prefix.parent.iterdir()) == []


def test_rewriting_a_shard_unpublishes_the_old_one_first(tmp_path):
    prefix = write_shard(shard_prefix(tmp_path, "web", "train", 0), [np.arange(10)])
    w = ShardWriter(prefix, 1000, HASH)
    assert list_shards(tmp_path, "web", "train") == []
    w.add_document(np.arange(20))
    w.close()
    assert ShardReader(prefix).num_tokens == 20


def test_aborted_rewrite_leaves_no_file_of_the_old_shard(tmp_path):
    prefix = write_shard(shard_prefix(tmp_path, "web", "train", 0), [np.arange(10)])
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(prefix, 1000, HASH) as w:
        w.add_document(np.arange(20))
        raise RuntimeError("boom")
    assert list(prefix.parent.iterdir()) == []


def test_failure_while_publishing_leaves_no_file(tmp_path, monkeypatch):
    prefix = shard_prefix(tmp_path, "web", "train", 0)
    w = ShardWriter(prefix, 1000, HASH)
    w.add_document(np.arange(20))
    monkeypatch.setattr(shards, "_encode_header", lambda header: 1 / 0)  # fails after the .bin rename
    with pytest.raises(ZeroDivisionError):
        w.close()
    assert list(prefix.parent.iterdir()) == []


def test_list_shards_sorts_and_filters_split(tmp_path):
    for split, i in [("train", 2), ("val", 0), ("train", 0), ("train", 1)]:
        write_shard(shard_prefix(tmp_path, "web", split, i), [np.arange(5)])
    assert [p.name for p in list_shards(tmp_path, "web", "train")] == [
        "train_00000",
        "train_00001",
        "train_00002",
    ]
    assert [p.name for p in list_shards(tmp_path, "web", "val")] == ["val_00000"]
    assert list_shards(tmp_path, "missing", "train") == []


def test_empty_shard_reads_as_zero_tokens(tmp_path):
    prefix = write_shard(tmp_path / "val_00000", [])
    r = ShardReader(prefix)
    r.verify()
    assert r.num_tokens == 0 and r.num_docs == 0 and r.tokens.shape == (0,)
    np.testing.assert_array_equal(r.doc_offsets, [0])
