"""The `llmtrain` command line: dispatch, launcher arguments, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmtrain.app import split_args
from llmtrain.cli import main
from llmtrain.config import CONFIG_DIR, Config, load_config
from llmtrain.errors import ConfigError


def test_split_args_drops_the_launchers_local_rank_and_reads_config_dir():
    config_dir, overrides, print_cfg = split_args(
        ["--local_rank=1", "model=tiny", "--local_rank", "0", "-cd", "/x", "--cfg", "optim.lr=1e-3"]
    )
    assert (config_dir, overrides, print_cfg) == ("/x", ["model=tiny", "optim.lr=1e-3"], True)


def test_cfg_prints_the_composed_config_with_overrides(capsys):
    assert main(["train", "--cfg", "model=tiny", "optim.lr=0.125"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.125" in out and "d_model: 64" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "train.max_stepz=3"], "train.max_stepz"),
        (["train", "model=nope"], "nope"),
        (["train", "deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
        (["train", "model.n_heads=5"], "model.n_heads"),
        (["train", "train.seq_len=4096", "model=tiny"], "train.seq_len"),
        (["train", "--config-dir", "/no/such/dir"], "/no/such/dir"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err


@pytest.mark.parametrize(
    ("override", "key"),
    [("optim.name=lion", "optim.name"), ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio")],
)
def test_values_the_ranks_would_reject_fail_when_composing(override, key):
    """Checked by load_config, so launch/pretrain.sh refuses them before any rank starts."""
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config([override])


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from llmtrain.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "prepare" in result.stdout and "export" in result.stdout


@pytest.mark.parametrize(
    "choice",
    sorted(f"{p.parent.name}={p.stem}" for p in CONFIG_DIR.glob("*/*.yaml")),
)
def test_every_config_group_option_composes_and_validates(choice):
    """Each YAML of each group, over the defaults: its keys exist and every value passes the checks."""
    assert isinstance(load_config([choice]), Config)
