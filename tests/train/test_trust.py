"""Never silently wrong: damaged shards and checkpoints, unsafe pickles, non-finite steps, a moved
learning-rate horizon, bad input and a full disk, each met by real training in this process (a world
of one). Every failure is an exit code and one line naming the file or key; nothing good is lost."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from trainer_runs import TINY_RUN, train

from llmtrain.cli import run as cli_run
from llmtrain.config import load_config
from llmtrain.data.shards import list_shards, shard_dir, shard_prefix
from llmtrain.train import checkpoint as ckpt
from llmtrain.train import manifest
from llmtrain.train.config import GuardConfig
from llmtrain.train.guard import Guard
from llmtrain.train.metrics import read_metrics

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # rank 0's ZeRO-1 optimizer shard
TRAIN = [
    *TINY_RUN,
    "train.val_every=0",
    "logging.plot=false",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trust")


@pytest.fixture(scope="module")
def overrides(prepared_data, root, restore_env):
    return lambda name, *extra: [*prepared_data.overrides, *TRAIN, f"run.dir={root / name}", *extra]


def run_dir_of(overrides: list[str]) -> Path:
    return load_config(overrides).run_dir


def records(run_dir: Path) -> dict[int, dict]:
    """The training record of every step (validation records left out)."""
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "lr" in r}


def losses(run_dir: Path) -> dict[int, float | None]:
    return {step: r["loss"] for step, r in records(run_dir).items()}


def one_line(capsys) -> str:
    """The only line this command printed on stderr (besides the precision a started run announces)."""
    lines = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        if not line.startswith("llmtrain train: precision ")
    ]
    assert len(lines) == 1, lines
    return lines[0]


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def flip_middle(path: Path, mask: int) -> None:
    """XOR the byte in the middle of `path` with `mask` (an even offset: a uint16 id's low byte)."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 & ~1] ^= mask
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def reference(overrides) -> Path:
    """4 uninterrupted steps, checkpoints at steps 2 and 4."""
    ov = overrides("ref")
    assert train(ov) == 0
    return run_dir_of(ov)


def copy_of(reference: Path, overrides, name: str, *extra: str) -> tuple[list[str], Path]:
    ov = overrides(name, *extra)
    run_dir = run_dir_of(ov)
    shutil.copytree(reference, run_dir)
    return ov, run_dir


# ---------------------------------------------------------------- 1. shards


@pytest.fixture(scope="module")
def flipped_data(prepared_data, root) -> tuple[Path, Path]:
    """The corpus with one byte flipped in the middle of a books train shard (every id stays < 512)."""
    data = root / "data_flipped"
    shutil.copytree(prepared_data.data_dir, data)
    prefix = shard_prefix(data, "books", "train", 1)
    shard = prefix.with_name(prefix.name + ".bin")
    flip_middle(shard, 0x01)
    return data, shard


def test_a_flipped_byte_in_a_shard_stops_training_naming_the_file(overrides, flipped_data, capsys):
    data, shard = flipped_data
    ov = overrides("flipped", f"data.dir={data}")
    assert cli_run("train", ov) == 2
    assert (
        one_line(capsys)
        == f"llmtrain train: error: {shard}: token checksum mismatch (file corrupt or modified)"
    )
    assert not run_dir_of(ov).exists()  # nothing trained, nothing written


def test_size_verification_reads_only_headers_and_trains(overrides, flipped_data):
    data, _ = flipped_data
    ov = overrides("flipped_size", f"data.dir={data}", "data.verify=size", "train.max_steps=2")
    assert train(ov) == 0
    got = losses(run_dir_of(ov))
    assert sorted(got) == [1, 2] and all(isinstance(loss, float) for loss in got.values())


def test_an_id_past_the_vocab_with_verification_off_is_caught_by_the_loader(
    overrides, flipped_data, root, capsys
):
    data = root / "data_poisoned"
    shutil.copytree(flipped_data[0], data)  # the flipped byte stays: nothing is repaired
    for prefix in list_shards(data, "web", "train"):
        shard = prefix.with_name(prefix.name + ".bin")
        shard.write_bytes(b"\xff\xff" * (shard.stat().st_size // 2))  # every id 65535, the index untouched
    assert cli_run("train", overrides("poisoned", f"data.dir={data}", "data.verify=off")) == 2
    assert one_line(capsys) == (
        f"llmtrain train: error: {shard_dir(data, 'web')}: token id 65535 >= vocab size 512 in a train "
        "shard of source 'web' (corrupt shard; data.verify=full names it)"
    )


# ---------------------------------------------------------------- 2. checkpoint integrity


def test_auto_resume_passes_over_a_corrupt_optimizer_shard_and_stays_bit_exact(reference, overrides, capsys):
    ov, run_dir = copy_of(reference, overrides, "bitflip")
    bad = ckpt.step_dir(run_dir, 4) / OPTIM
    flip_middle(bad, 0xFF)  # 8 flipped bits: DeepSpeed would unpickle this without a word
    capsys.readouterr()
    assert train(ov) == 0  # resume=auto
    err = capsys.readouterr().err
    assert (
        f"llmtrain train: WARNING: not resuming from step_4: {bad}: checksum mismatch (altered or corrupt); "
        "trying an older checkpoint"
    ) in err
    assert f"resumed from {ckpt.step_dir(run_dir, 2)} at step 2" in err
    assert losses(run_dir) == losses(reference)  # steps 3-4 recomputed, bit for bit
    manifest.verify_all(ckpt.step_dir(run_dir, 4))  # and saved again, whole


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("flip", "checksum mismatch (altered or corrupt)"),
        ("truncate", "{cut} bytes, manifest says {size} (truncated)"),
        ("delete", "missing"),
    ],
)
def test_a_named_damaged_checkpoint_is_refused_naming_the_file(reference, overrides, capsys, damage, problem):
    ov, run_dir = copy_of(reference, overrides, f"named_{damage}")
    step_4 = ckpt.step_dir(run_dir, 4)
    bad = step_4 / OPTIM
    size = bad.stat().st_size
    if damage == "flip":
        flip_middle(bad, 0x10)
    elif damage == "truncate":
        os.truncate(bad, size // 2)
    else:
        bad.unlink()
    assert cli_run("train", [*ov, f"resume={step_4}"]) == 2
    detail = problem.format(cut=size // 2, size=size)
    assert one_line(capsys) == f"llmtrain train: error: resume={step_4}: {bad}: {detail}"


def test_garbage_in_latest_falls_back_to_scanning(reference, overrides, capsys):
    ov, run_dir = copy_of(reference, overrides, "garbage_latest")
    latest = run_dir / "checkpoints" / "latest"
    for garbage in (b"\xff\xfe\x00\x81", b"step_9", b"../../step_4"):
        latest.write_bytes(garbage)
        assert ckpt.latest_complete(run_dir) == ckpt.step_dir(run_dir, 4)
    latest.write_bytes(b"\xff\xfe\x00\x81 not a step")
    capsys.readouterr()
    assert train(ov) == 0
    err = capsys.readouterr().err
    assert f"resumed from {ckpt.step_dir(run_dir, 4)} at step 4" in err
    assert "train.max_steps=4 already reached; nothing to do" in err


# ---------------------------------------------------------------- 3. nothing unverified is unpickled


class _Payload:
    """Unpickling this runs a shell command: what a malicious "checkpoint" does."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.sentinel))}",)


def test_the_payload_runs_when_unpickled(tmp_path):
    """So its sentinel staying absent below means nothing unpickled it."""
    pickle.loads(pickle.dumps(_Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def crafted(reference, root) -> tuple[Path, Path]:
    """A complete-looking step_1 made elsewhere: COMPLETE, the state and config of a real checkpoint,
    no MANIFEST.json, and DeepSpeed model states that `touch` the sentinel when unpickled."""
    import torch

    folder = ckpt.step_dir(root / "crafted_run", 1)
    folder.mkdir(parents=True)
    real = ckpt.step_dir(reference, 2)
    state = json.loads((real / ckpt.STATE_FILE).read_text())
    (folder / ckpt.STATE_FILE).write_text(json.dumps({**state, "step": 1}))
    shutil.copy(real / ckpt.CONFIG_FILE, folder / ckpt.CONFIG_FILE)
    sentinel = root / "PAYLOAD_RAN"
    torch.save({"module": _Payload(sentinel)}, folder / "mp_rank_00_model_states.pt")
    (folder / ckpt.COMPLETE).write_text("1\n")
    return folder, sentinel


@pytest.mark.parametrize(
    "command, key",
    [
        ("generate", "generate.checkpoint"),
        ("eval", "eval.checkpoint"),
        ("export", "export.checkpoint"),
        ("checkpoint", "resume"),
        ("train", "resume"),
    ],
)
def test_a_checkpoint_without_a_manifest_is_refused_before_unpickling(
    crafted, overrides, capsys, command, key
):
    folder, sentinel = crafted
    assert cli_run(command, [*overrides(f"crafted_{command}"), f"{key}={folder}"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"llmtrain {command}: error: ")
    assert f"{folder} has no {manifest.MANIFEST}" in line and "checkpoint.trust_unverified=true" in line
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "command, key", [("generate", "generate.checkpoint"), ("export", "export.checkpoint")]
)
def test_trusting_an_unverified_checkpoint_still_reads_it_safely(crafted, overrides, capsys, command, key):
    folder, sentinel = crafted
    argv = [*overrides(f"trusted_{command}"), f"{key}={folder}", "checkpoint.trust_unverified=true"]
    with pytest.warns(UserWarning, match="loading it unverified"):
        assert cli_run(command, argv) == 2
    line = one_line(capsys)
    assert line.startswith(
        f"llmtrain {command}: error: {folder / 'mp_rank_00_model_states.pt'}: cannot be read safely"
    )
    assert "posix.system" in line  # what the safe unpickler refused, not torch's advice to load unsafely
    assert not sentinel.exists()


# ---------------------------------------------------------------- 4. the non-finite guard


@pytest.fixture
def poison_step(monkeypatch):
    """`poison_step(n)`: the first micro-batch of optimizer step n (once) has a NaN loss, so NaN
    gradients: DeepSpeed's overflow check skips that update, as with a real blow-up."""
    from llmtrain.distributed.backend import DeepSpeedBackend

    def arm(step: int, accumulation: int = 2) -> None:
        calls = itertools.count()
        backward = DeepSpeedBackend.backward

        def poisoned(self, loss):
            if next(calls) == (step - 1) * accumulation:
                loss = loss * float("nan")
            backward(self, loss)

        monkeypatch.setattr(DeepSpeedBackend, "backward", poisoned)

    return arm


def test_one_non_finite_step_is_skipped_and_its_checkpoint_waits_for_the_next_good_one(
    overrides, poison_step, capsys
):
    poison_step(2)  # checkpoint.every_steps=2 falls on it
    ov = overrides("nan_skip")
    assert train(ov) == 0
    assert "llmtrain train: step 2: non-finite gradient norm, update skipped" in capsys.readouterr().err
    run_dir = run_dir_of(ov)
    got = records(run_dir)
    assert got[2]["loss"] is None and got[2]["skipped_steps"] == 1
    assert all(isinstance(got[s]["loss"], float) and got[s]["skipped_steps"] == 1 for s in (3, 4))
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [3, 4]
    assert ckpt.read_state(ckpt.step_dir(run_dir, 3))["guard"]["skipped_total"] == 1


def test_guard_stop_ends_at_the_first_non_finite_step_saving_nothing(overrides, poison_step, capsys):
    poison_step(3)
    ov = overrides("nan_stop", "guard.nonfinite=stop")
    assert cli_run("train", ov) == 2
    assert last_line(capsys) == (
        "llmtrain train: error: step 3: non-finite gradient norm, update skipped; "
        "stopping (guard.nonfinite=stop), nothing saved"
    )
    run_dir = run_dir_of(ov)
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_2"


def test_guard_rollback_reloads_the_last_checkpoint_and_replays_exactly(
    reference, overrides, poison_step, capsys
):
    poison_step(3)
    ov = overrides("nan_rollback", "guard.nonfinite=rollback")
    assert train(ov) == 0
    err = capsys.readouterr().err
    assert "llmtrain train: rolled back to step_2 (step 2), skipping the next 0 batch(es)" in err
    run_dir = run_dir_of(ov)
    assert losses(run_dir) == losses(reference)  # model, optimizer, loader and RNG all came back
    assert records(run_dir)[4]["rollbacks"] == 1


@pytest.mark.parametrize(
    "name, extra, last_good",
    [
        ("lr_1e6", ["optim.lr=1e6", "schedule.warmup_steps=0"], 1),  # step 1's update blows it up
        ("init_1e30", ["model.init_std=1e30"], 0),  # not one finite step
    ],
)
def test_a_diverged_run_stops_after_five_skips_keeping_only_good_checkpoints(
    overrides, capsys, name, extra, last_good
):
    ov = overrides(name, *extra, "train.max_steps=10")
    assert cli_run("train", ov) == 2
    stop = last_good + 5
    assert last_line(capsys) == (
        f"llmtrain train: error: step {stop}: 5 consecutive steps with a non-finite gradient norm "
        "(guard.max_consecutive_skips=5); lower optim.lr or check the data; "
        "stopping (guard.nonfinite=skip), nothing saved"
    )
    run_dir = run_dir_of(ov)
    got = records(run_dir)
    assert sorted(got) == list(range(1, stop))  # the stopping step is not logged
    assert all(got[s]["loss"] is None for s in range(last_good + 1, stop))
    assert got[stop - 1]["skipped_steps"] == 4
    # every_steps=2 fell on skipped steps too: none of them saved a checkpoint of a diverged model
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == list(range(2, last_good + 1, 2))


def guard(**overrides) -> Guard:
    return Guard(replace(GuardConfig(), **overrides))


def test_guard_skips_then_stops_after_max_consecutive_skips():
    g = guard(max_consecutive_skips=3)
    assert g.on_step(1, skipped=True).action == "ok"
    assert g.on_step(2, skipped=False).action == "ok" and g.consecutive == 0  # a good step resets
    assert g.on_step(3, skipped=True).reason == "step 3: non-finite gradient norm, update skipped"
    assert g.on_step(4, skipped=True).action == "ok"
    verdict = g.on_step(5, skipped=True)
    assert verdict.action == "stop" and verdict.reason.startswith("step 5: 3 consecutive steps")
    assert g.metrics() == {"skipped_steps": 4, "loss_spikes": 0, "rollbacks": 0}


def test_guard_rollback_and_stop_verdicts():
    assert guard(nonfinite="rollback").on_step(7, skipped=True).action == "rollback"
    assert guard(nonfinite="stop").on_step(7, skipped=True).action == "stop"
    assert guard(nonfinite="rollback").on_log(7, float("nan")).action == "rollback"
    # applied updates gave a non-finite loss: "skip" cannot undo them, so it stops
    verdict = guard(nonfinite="skip").on_log(7, float("inf"))
    assert (
        verdict.action == "stop" and verdict.reason == "step 7: non-finite loss (inf) after applied updates"
    )


WINDOW = [3.0, 3.1, 2.9, 3.0, 3.05, 2.95]


@pytest.mark.parametrize("action, expected", [("skip", "ok"), ("rollback", "rollback"), ("stop", "stop")])
def test_guard_spike_detector(action, expected):
    g = guard(nonfinite=action, spike_sigma=4.0, spike_window=6)
    assert [g.on_log(s, loss).action for s, loss in enumerate(WINDOW, 1)] == ["ok"] * 6
    assert g.on_log(7, 3.1).reason == ""  # within 4 sigma
    verdict = g.on_log(8, 9.0)
    assert verdict.action == expected and "loss spike 9.0000" in verdict.reason and g.spikes == 1
    # only a spike that was let through ("skip") joins the window it is judged against
    assert (9.0 in g.state_dict()["window"]) == (action == "skip")


def test_guard_state_round_trips_and_continues_identically():
    g = guard(max_consecutive_skips=3, spike_sigma=4.0, spike_window=6)
    for step, loss in enumerate(WINDOW, 1):
        g.on_log(step, loss)
    g.on_step(7, skipped=True)
    g.on_step(8, skipped=True)
    state = json.loads(json.dumps(g.state_dict()))  # as it travels in llmtrain_state.json
    restored = guard(max_consecutive_skips=3, spike_sigma=4.0, spike_window=6)
    restored.load_state_dict(state)
    assert restored.state_dict() == g.state_dict()
    assert restored.on_step(9, skipped=True) == g.on_step(9, skipped=True)  # the third in a row: stop
    assert restored.on_log(10, 9.0) == g.on_log(10, 9.0)


# ---------------------------------------------------------------- 5. the learning-rate horizon

COSINE = ["schedule=cosine", "schedule.warmup_steps=1", "train.max_steps=6", "checkpoint.every_steps=3"]


@pytest.fixture(scope="module")
def cosine(overrides) -> Path:
    ov = overrides("cosine", *COSINE)
    assert train(ov) == 0
    return run_dir_of(ov)


def lrs(run_dir: Path) -> dict[int, float]:
    return {step: r["lr"] for step, r in records(run_dir).items()}


def test_a_longer_resume_keeps_the_horizon_and_says_the_lr_stays_at_its_floor(cosine, overrides, capsys):
    ov, run_dir = copy_of(cosine, overrides, "cosine_longer", *COSINE, "train.max_steps=12")
    capsys.readouterr()
    assert train([*ov, "resume=step_3"]) == 0
    err = capsys.readouterr().err
    assert (
        "llmtrain train: note: train.max_steps=12 runs past the learning-rate horizon 6: from step 6 on the lr "
        "stays at its floor 3.000e-04; set schedule.total_steps=12 to stretch the schedule instead"
    ) in err
    got, reference = lrs(run_dir), lrs(cosine)
    assert got == {**reference, **{s: pytest.approx(3e-4, rel=1e-12) for s in range(7, 13)}}
    assert [got[s] for s in (4, 5, 6)] == [reference[s] for s in (4, 5, 6)]  # exactly, not approx


def test_an_explicit_total_steps_moves_the_horizon_with_a_note(cosine, overrides, capsys):
    from llmtrain.train.schedule import lr_at

    ov, run_dir = copy_of(cosine, overrides, "cosine_stretched", *COSINE, "train.max_steps=12")
    capsys.readouterr()
    assert train([*ov, "resume=step_3", "schedule.total_steps=12"]) == 0
    err = capsys.readouterr().err
    assert (
        "llmtrain train: note: schedule.total_steps=12 replaces the horizon 6 of this run: the lr at step 3"
        in err
    )
    assert "runs past the learning-rate horizon" not in err
    schedule = load_config([*ov, "schedule.total_steps=12"]).schedule
    expected = {s: lr_at(s - 1, base_lr=3e-3, schedule=schedule, max_steps=12) for s in range(4, 13)}
    got = lrs(run_dir)
    assert {s: got[s] for s in range(4, 13)} == expected
    assert got[4] > lrs(cosine)[4]  # the cosine is stretched: higher than on the old horizon


# ---------------------------------------------------------------- 6. one-line errors


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("+train.max_stepz=5", ["train.max_stepz"]),
        ("train.micro_batch_size=abc", ["train.micro_batch_size", "could not be converted"]),
        ("model=llama_9b", ["llama_9b", "tiny", "llama_125m"]),
    ],
)
def test_a_bad_override_is_one_line(overrides, capsys, override, fragments):
    assert cli_run("train", [*overrides("bad_override"), override]) == 2
    line = one_line(capsys)
    assert line.startswith("llmtrain train: error: ")
    assert all(f in line for f in fragments), line


def test_eval_auto_on_a_run_without_checkpoints_is_one_line(overrides, capsys):
    ov = overrides("never_trained")
    run_dir_of(ov).mkdir()
    assert cli_run("eval", [*ov, "eval.checkpoint=auto"]) == 2
    line = one_line(capsys)
    assert (
        line
        == f"llmtrain eval: error: no complete checkpoint in {run_dir_of(ov) / 'checkpoints'}; train first"
    )


def test_another_tokenizer_named_at_train_time_is_one_line(overrides, prepared_data, tmp_path, capsys):
    from llmtrain.data.config import TokenizerConfig
    from llmtrain.data.tokenizer import train_tokenizer

    texts = [p.read_text() for p in sorted((prepared_data.corpus_dir / "books").glob("*.txt"))]
    other = train_tokenizer(TokenizerConfig(vocab_size=384, threads=1), texts, tmp_path / "other").path
    assert cli_run("train", [*overrides("other_tokenizer"), f"tokenizer.path={other}"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"llmtrain train: error: tokenizer.path={other}: not the tokenizer of ")


def test_prepare_on_an_empty_file_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.touch()
    argv = [
        f"data.dir={tmp_path / 'data'}",
        f"data.sources=[{{name:empty,path:'{empty}',format:txt,weight:1.0}}]",
        "tokenizer.vocab_size=512",
        "prepare.workers=1",
        "prepare.progress=false",
    ]
    assert cli_run("prepare", argv) == 2
    line = one_line(capsys)
    assert (
        line.startswith("llmtrain prepare: error: no text to train the tokenizer on") and str(empty) in line
    )


def test_a_missing_resume_path_is_one_line_in_preflight_and_train(overrides, capsys):
    ov = [*overrides("nonexistent"), "resume=/nonexistent"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pre = subprocess.run(
        [sys.executable, "-m", "llmtrain.preflight", "2", *ov], capture_output=True, text=True, env=env
    )
    assert pre.returncode == 2
    assert pre.stderr.strip().splitlines() == [
        "pretrain.sh: error: resume=/nonexistent: checkpoint /nonexistent does not exist"
    ]
    assert cli_run("train", ov) == 2
    assert (
        one_line(capsys)
        == "llmtrain train: error: resume=/nonexistent: checkpoint /nonexistent does not exist"
    )


# ---------------------------------------------------------------- 7. a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of `size` (e.g. "4m") at a fresh folder, unmounted afterwards; skip where mount fails."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / "tmpfs"
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(
    reference, overrides, small_disk, tmp_path, capsys
):
    sizes = [
        sum(e["size"] for e in manifest.read_manifest(ckpt.step_dir(reference, s))["files"].values())
        for s in (2, 4)
    ]
    # room for step_2 and the run's small files, not for step_4 next to it
    disk = small_disk(f"{(sizes[0] + sizes[1] // 2) // 1024}k")
    ov = [*overrides("full_disk"), f"run.dir={disk / 'run'}"]
    assert cli_run("train", ov) == 2
    run_dir = disk / "run"
    assert last_line(capsys) == (
        f"llmtrain train: error: {run_dir / 'checkpoints'}: no space left on device while saving step_4; "
        "the previous checkpoint is kept"
    )
    assert ckpt.complete_checkpoints(run_dir) == [ckpt.step_dir(run_dir, 2)]
    assert not ckpt.step_dir(run_dir, 4).exists()  # the partial folder was removed
    assert all(step == 2 or not ckpt.is_complete(path) for step, path in ckpt.list_checkpoints(run_dir))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_2"

    # copied to a disk with room, step_2 verifies and the run resumes from it exactly
    ov, moved = copy_of(run_dir, overrides, "full_disk_moved")
    assert ckpt.resolve_checkpoint(moved, None) == ckpt.step_dir(moved, 2)
    manifest.verify_all(ckpt.step_dir(moved, 2))
    assert train(ov) == 0
    assert losses(moved) == losses(reference)
