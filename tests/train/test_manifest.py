"""MANIFEST.json: every kind of damage to a checkpoint folder is caught, with the file named, before loading."""

from __future__ import annotations

import json
import re
import zlib

import pytest

from llmtrain.errors import CheckpointError
from llmtrain.train import manifest
from llmtrain.train.manifest import UnverifiedCheckpoint

FILES = {
    "mp_rank_00_model_states.pt": 300_000,
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": 500_000,
    "zero_pp_rank_1_mp_rank_00_optim_states.pt": 500_001,
    "rng_rank00000.pt": 1_500,
    "rng_rank00001.pt": 1_500,
    "llmtrain_state.json": 200,
    "config.yaml": 0,
    "zero/embed.weight/fp32.pt": 40_000,
    "zero/embed.weight/exp_avg.pt": 40_000,
}


def fake_checkpoint(folder, files=FILES):
    """A folder of DeepSpeed-like files with distinct bytes, its manifest written as a save would."""
    for i, (relpath, size) in enumerate(files.items()):
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes((i * 7 + j) % 251 for j in range(size)))
    manifest.write_manifest(folder, manifest.hash_files(folder, manifest.list_files(folder), threads=3))
    (folder / "COMPLETE").write_text("10\n")
    return folder


def test_intact_checkpoint_round_trips_and_verifies(tmp_path):
    fake_checkpoint(tmp_path)
    document = manifest.read_manifest(tmp_path)
    assert document["format"] == manifest.FORMAT and document["algorithm"] == "crc32"
    assert list(document["files"]) == sorted(FILES)  # sorted, nested paths in posix form
    assert {p: e["size"] for p, e in document["files"].items()} == FILES
    data = (tmp_path / "rng_rank00000.pt").read_bytes()
    assert document["files"]["rng_rank00000.pt"]["checksum"] == f"crc32:{zlib.crc32(data):08x}"
    manifest.verify_all(tmp_path)
    for rank in range(3):
        manifest.verify(tmp_path, rank=rank, world_size=3, threads=2)


def test_list_files_recurses_and_leaves_out_manifest_and_marker(tmp_path):
    fake_checkpoint(tmp_path)
    (tmp_path / "zero" / "embed.weight" / "COMPLETE").write_text("")  # only the top-level marker is skipped
    assert manifest.list_files(tmp_path) == sorted([*FILES, "zero/embed.weight/COMPLETE"])


def test_flipped_bit_in_the_middle_names_the_file(tmp_path):
    fake_checkpoint(tmp_path)
    target = tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(data)
    with pytest.raises(CheckpointError, match="checksum mismatch") as caught:
        manifest.verify_all(tmp_path)
    assert str(caught.value) == f"{target}: checksum mismatch (altered or corrupt)"


def test_altered_file_in_zero_subfolder_is_caught(tmp_path):
    fake_checkpoint(tmp_path)
    target = tmp_path / "zero" / "embed.weight" / "exp_avg.pt"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(target))}: checksum mismatch"):
        manifest.verify_all(tmp_path)


def test_truncated_file_reports_both_sizes(tmp_path):
    fake_checkpoint(tmp_path)
    target = tmp_path / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes()[:123])
    with pytest.raises(CheckpointError) as caught:
        manifest.verify_all(tmp_path)
    assert str(caught.value) == f"{target}: 123 bytes, manifest says 300000 (truncated)"


def test_deleted_file_is_missing(tmp_path):
    fake_checkpoint(tmp_path)
    (tmp_path / "rng_rank00001.pt").unlink()
    with pytest.raises(CheckpointError) as caught:
        manifest.verify_all(tmp_path)
    assert str(caught.value) == f"{tmp_path / 'rng_rank00001.pt'}: missing"


def test_size_problems_are_reported_before_any_hashing(tmp_path, monkeypatch):
    fake_checkpoint(tmp_path)
    (tmp_path / "zero" / "embed.weight" / "fp32.pt").unlink()  # sorts after the corrupt file below
    (tmp_path / "config.yaml").write_bytes(b"x")  # grown; sorts first

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed although a size was already wrong")

    monkeypatch.setattr(manifest, "checksum_file", no_hashing)
    with pytest.raises(CheckpointError, match="1 bytes, manifest says 0 .larger than when saved."):
        manifest.verify_all(tmp_path)


def test_checkpoint_without_manifest_is_unverified(tmp_path):
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    assert manifest.read_manifest(tmp_path) is None
    with pytest.raises(UnverifiedCheckpoint, match="no MANIFEST.json.*checkpoint.trust_unverified=true"):
        manifest.verify_all(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        '{"format": 1, "files": {"a.pt": {"size": 3, "chec',  # cut short
        "[1, 2, 3]",
        '{"format": 99, "files": {}}',
        '{"format": 1, "files": {"a.pt": {"size": -1, "checksum": "crc32:00000000"}}}',
        '{"format": 1, "files": {"a.pt": {"size": 3, "checksum": "md4:00"}}}',
        '{"format": 1, "files": {"../../etc/passwd": {"size": 3, "checksum": "crc32:00000000"}}}',
    ],
)
def test_garbage_manifest_is_a_checkpoint_error_naming_it(tmp_path, text):
    (tmp_path / manifest.MANIFEST).write_text(text)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path / manifest.MANIFEST))}") as caught:
        manifest.verify_all(tmp_path)
    assert not isinstance(caught.value, UnverifiedCheckpoint)
    assert "\n" not in str(caught.value)


def test_entries_with_another_algorithm_still_verify(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"some optimizer state")
    size, checksum = manifest.checksum_file(tmp_path / "a.pt", "sha256")
    manifest.write_manifest(tmp_path, {"a.pt": {"size": size, "checksum": checksum}})
    manifest.verify_all(tmp_path)
    (tmp_path / "a.pt").write_bytes(b"some optimizer stat!")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        manifest.verify_all(tmp_path)


def test_writing_leaves_no_temporary_file(tmp_path):
    fake_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert json.loads((tmp_path / manifest.MANIFEST).read_text())["files"]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 16])
def test_rank_split_covers_every_entry_exactly_once(world_size):
    entries = {f"f{i}": {"size": (i * 7919) % 1000 + 1, "checksum": "crc32:0"} for i in range(50)}
    shares = [manifest.share_of_rank(entries, r, world_size) for r in range(world_size)]
    assert sorted(p for share in shares for p in share) == sorted(entries)
    loads = [sum(entries[p]["size"] for p in share) for share in shares]
    assert max(loads) - min(loads) <= max(e["size"] for e in entries.values())  # balanced by size
    assert shares == [
        manifest.share_of_rank(dict(reversed(entries.items())), r, world_size) for r in range(world_size)
    ]


def test_each_rank_catches_only_damage_in_its_own_share(tmp_path):
    fake_checkpoint(tmp_path)
    entries = manifest.read_manifest(tmp_path)["files"]
    damaged = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    (tmp_path / damaged).write_bytes(b"")
    owner = next(r for r in range(2) if damaged in manifest.share_of_rank(entries, r, 2))
    with pytest.raises(CheckpointError, match=damaged):
        manifest.verify(tmp_path, rank=owner, world_size=2)
    manifest.verify(tmp_path, rank=1 - owner, world_size=2)
