"""Running one llmtrain command: parse the arguments, compose the config, turn user errors into one line.

Shared by the `llmtrain` CLI, `python -m llmtrain.train` (what the deepspeed launcher runs on every
rank) and the launcher's pre-flight check, so none of them imports another's entry point.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable


def split_args(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """(config_dir, overrides, print_cfg); drops the deepspeed launcher's --local_rank."""
    config_dir, overrides, print_cfg = None, [], False
    it = iter(argv)
    for arg in it:
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            if "=" not in arg:
                next(it, None)
        elif arg in ("--config-dir", "-cd"):
            config_dir = next(it, None)
            if config_dir is None:
                raise SystemExit(f"llmtrain: {arg} needs a folder")
        elif arg.startswith("--config-dir="):
            config_dir = arg.split("=", 1)[1]
        elif arg == "--cfg":
            print_cfg = True
        elif arg.startswith("-"):
            raise SystemExit(f"llmtrain: unknown option {arg!r} (config values are key=value)")
        else:
            overrides.append(arg)
    return config_dir, overrides, print_cfg


def print_config(cfg) -> None:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")


def resolve(target: str) -> Callable:
    """`"package.module:function"` -> the function (imported only when the command runs)."""
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def run(command: str, target: str, argv: list[str]) -> int:
    """Compose the config from `argv` and call `target(cfg)`; a UserError becomes one line and rc 2."""
    from llmtrain.config import load_config
    from llmtrain.errors import JobError, UserError

    try:
        config_dir, overrides, print_cfg = split_args(argv)
        cfg = load_config(overrides, config_dir=config_dir)
        if print_cfg:
            print_config(cfg)
            return 0
        return int(resolve(target)(cfg) or 0)
    except UserError as err:
        if os.environ.get("LLMTRAIN_DEBUG"):
            raise
        print(f"llmtrain {command}: error: {err}", file=sys.stderr)
        return 2
    except JobError as err:
        if os.environ.get("LLMTRAIN_DEBUG"):
            raise
        print(f"llmtrain {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llmtrain {command}: interrupted", file=sys.stderr)
        return 130
