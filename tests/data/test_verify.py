"""Shard verification before training: each mode catches what it promises, ranks share the work by
bytes, and every rank fails with the same message whichever rank saw the bad shard."""

from __future__ import annotations

import json
import shutil
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from llmtrain.data import shards
from llmtrain.data.shards import ShardWriter
from llmtrain.data.verify import (
    VerifyResult,
    agree,
    shards_to_verify,
    split_by_size,
    start_verification,
)
from llmtrain.errors import DataError


@pytest.fixture
def corpus(prepared_data, tmp_path) -> tuple[Path, list[Path]]:
    """A private copy of the prepared corpus (tests corrupt it) and its shard prefixes."""
    data_dir = tmp_path / "data"
    shutil.copytree(prepared_data.data_dir, data_dir)
    return data_dir, shards_to_verify(data_dir, prepared_data.sources)


def bin_of(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".bin")


def flip_middle_byte(prefix: Path) -> None:
    path = bin_of(prefix)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def set_header_vocab(prefix: Path, vocab_size: int) -> None:
    """Re-encode the index header claiming a smaller vocabulary, keeping tokens and checksums."""
    idx = prefix.with_name(prefix.name + ".idx")
    raw = idx.read_bytes()
    _, _, length = struct.unpack("<8sII", raw[:16])
    head = json.loads(raw[16 : 16 + length])
    head["vocab_size"] = vocab_size
    idx.write_bytes(shards._encode_header(head) + raw[16 + length :])


def check(prefixes, mode="full", **kwargs) -> VerifyResult:
    return start_verification(prefixes, mode=mode, **kwargs).wait()


def test_shards_to_verify_lists_train_then_val_of_each_source_in_order(corpus, prepared_data):
    data_dir, prefixes = corpus
    expected = [
        p
        for name in prepared_data.sources
        for split in ("train", "val")
        for p in shards.list_shards(data_dir, name, split)
    ]
    assert prefixes == expected
    assert {p.parent.name for p in prefixes} == {"books", "web"}
    assert any(p.name.startswith("val_") for p in prefixes)
    assert shards_to_verify(data_dir, ["web", "books", "web"]) == [
        p for p in prefixes if "web" in p.parts
    ] + [p for p in prefixes if "books" in p.parts]


def test_clean_corpus_passes_full_check_and_agree(corpus, prepared_data):
    _, prefixes = corpus
    result = check(prefixes, vocab_size=prepared_data.vocab_size)
    assert result.error is None and result.bad_shards == ()
    assert result.shards_checked == len(prefixes)
    assert result.bytes_checked > sum(bin_of(p).stat().st_size for p in prefixes)  # plus the offsets
    agree(result)


def test_flipped_byte_in_middle_of_bin_fails_naming_the_bin(corpus):
    _, prefixes = corpus
    flip_middle_byte(prefixes[1])
    result = check(prefixes)
    assert result.bad_shards == (str(prefixes[1]),)
    with pytest.raises(DataError) as err:
        agree(result)
    assert str(err.value) == f"{bin_of(prefixes[1])}: token checksum mismatch (file corrupt or modified)"


def test_out_of_range_token_id_is_reported(tmp_path):
    prefix = tmp_path / "shards" / "src" / "train_00000"
    with ShardWriter(prefix, vocab_size=1000, tokenizer_hash="h") as writer:
        writer.add_document(np.array([5, 999, 7, 1]))
    set_header_vocab(prefix, 600)  # checksums still match: only the range check can tell
    result = check(shards_to_verify(tmp_path, ["src"]))
    assert result.error == f"{bin_of(prefix)}: token id 999 >= vocab size 600"


def test_size_mode_catches_truncated_bin_but_not_flipped_byte(corpus):
    _, prefixes = corpus
    flip_middle_byte(prefixes[0])
    assert check(prefixes, mode="size").error is None
    path = bin_of(prefixes[-1])
    path.write_bytes(path.read_bytes()[:-2])
    result = check(prefixes, mode="size")
    assert result.bad_shards == (str(prefixes[-1]),)
    assert result.error.startswith(f"{path}: ") and result.error.endswith("(truncated)")
    assert result.shards_checked == len(prefixes) and result.bytes_checked == 0


def test_wrong_tokenizer_fails_every_shard_and_says_how_many_more(corpus):
    _, prefixes = corpus
    result = check(prefixes, mode="size", tokenizer_hash="0" * 64)
    assert len(result.bad_shards) == len(prefixes)
    with pytest.raises(DataError, match=rf"not the current 0+; .* \(and {len(prefixes) - 1} more\)$"):
        agree(result)


def test_off_mode_checks_nothing(corpus):
    _, prefixes = corpus
    bin_of(prefixes[0]).unlink()
    result = check(prefixes, mode="off")
    assert result == VerifyResult()
    agree(result)


def test_unknown_mode_and_bad_rank_are_rejected(corpus):
    _, prefixes = corpus
    with pytest.raises(ValueError, match="unknown shard verify mode 'fast'"):
        start_verification(prefixes, mode="fast")
    with pytest.raises(ValueError, match="rank 2 outside world of size 2"):
        start_verification(prefixes, mode="full", rank=2, world_size=2)


def test_failures_are_captured_not_raised_from_the_thread(tmp_path):
    missing = tmp_path / "shards" / "src" / "train_00000"
    result = check([missing])
    assert result.error == f"{missing}.idx: shard index not found"


def test_rank_split_covers_every_shard_once_and_balances_bytes():
    rng = np.random.default_rng(0)
    for world in (1, 2, 3, 8, 64):
        sizes = rng.integers(1, 1 << 30, size=int(rng.integers(0, 300))).tolist()
        shares = split_by_size(sizes, world)
        assert len(shares) == world
        assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
        assert all(share == sorted(share) for share in shares)
        loads = [sum(sizes[i] for i in share) for share in shares]
        if sizes:
            assert max(loads) - min(loads) <= max(sizes)
        assert split_by_size(sizes, world) == shares  # same on every rank
    equal = split_by_size([100] * 10, 4)
    assert sorted(len(share) for share in equal) == [2, 2, 3, 3]


def test_full_mode_ranks_share_the_shards_and_only_the_owner_sees_the_flip(corpus):
    _, prefixes = corpus
    world = 3
    owner = next(
        r
        for r, share in enumerate(split_by_size([bin_of(p).stat().st_size for p in prefixes], world))
        if 0 in share
    )
    flip_middle_byte(prefixes[0])
    results = [check(prefixes, rank=r, world_size=world) for r in range(world)]
    assert sum(r.shards_checked for r in results) == len(prefixes)
    assert [r.error is not None for r in results] == [r == owner for r in range(world)]


def _agree_worker(rank: int, world: int, port: int, prefixes: list[Path], out_dir: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = start_verification(prefixes, mode="full", rank=rank, world_size=world).wait()
        (out_dir / f"saw_{rank}").write_text(str(result.error is not None))
        try:
            agree(result)
            message = "no error"
        except DataError as err:
            message = str(err)
        (out_dir / f"rank_{rank}").write_text(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_agree_makes_every_rank_raise_what_one_rank_saw(corpus, tmp_path):
    import torch.multiprocessing as mp

    _, prefixes = corpus
    shares = split_by_size([bin_of(p).stat().st_size for p in prefixes], 2)
    bad = prefixes[shares[1][0]]
    flip_middle_byte(bad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_agree_worker, args=(2, port, prefixes, tmp_path), nprocs=2, join=True)
    assert [(tmp_path / f"saw_{r}").read_text() for r in range(2)] == ["False", "True"]
    expected = f"{bin_of(bad)}: token checksum mismatch (file corrupt or modified)"
    assert [(tmp_path / f"rank_{r}").read_text() for r in range(2)] == [expected, expected]
