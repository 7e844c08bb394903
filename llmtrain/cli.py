"""`llmtrain <subcommand> [--config-dir DIR] [--cfg] [key=value ...]`.

Every subcommand composes the same Hydra config tree, so the launcher, the trainer and the tools
take the same overrides. Errors in the user's input print as one line (LLMTRAIN_DEBUG=1 for a
traceback).
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("llmtrain.data.prepare", "main", "train the tokenizer and tokenize the corpus into shards"),
    "train": ("llmtrain.train.trainer", "main", "pretrain (one process, or every rank under `deepspeed`)"),
    "eval": (
        "llmtrain.eval.evaluate",
        "main",
        "validation loss / perplexity / bits per byte of a checkpoint",
    ),
    "generate": ("llmtrain.generate", "main", "sample text from a checkpoint"),
    "export": ("llmtrain.export", "main", "write a checkpoint as a Hugging Face model (safetensors)"),
    "checkpoint": (
        "llmtrain.train.universal",
        "main",
        "convert a checkpoint to DeepSpeed's universal format",
    ),
    "config": ("llmtrain.cli", "print_config", "print the composed config and exit"),
}

USAGE = """usage: llmtrain <command> [--config-dir DIR] [--cfg] [key=value ...]

commands:
{commands}

options:
  --config-dir DIR, -cd DIR   also search DIR for config groups (e.g. DIR/data/mycorpus.yaml)
  --cfg                       print the composed config and exit
  -h, --help                  this help

examples:
  llmtrain prepare                                   # tokenizer + shards of the built-in corpus
  llmtrain train debug=cpu                           # tiny model on this machine
  launch/pretrain.sh model=llama_125m deepspeed=zero2  # all local GPUs
"""


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


def run(command: str, argv: list[str]) -> int:
    from llmtrain.config import load_config
    from llmtrain.errors import UserError

    if command not in COMMANDS:
        print(f"llmtrain: unknown command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[command]
    try:
        config_dir, overrides, print_cfg = split_args(argv)
        cfg = load_config(overrides, config_dir=config_dir)
        if print_cfg:
            print_config(cfg)
            return 0
        result = getattr(importlib.import_module(module), func)(cfg)
        return int(result or 0)
    except UserError as err:
        if os.environ.get("LLMTRAIN_DEBUG"):
            raise
        print(f"llmtrain {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmtrain {command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items())
        print(USAGE.format(commands=lines))
        return 0 if argv else 2
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
