"""`llmtrain <subcommand> [--config-dir DIR] [--cfg] [key=value ...]`.

Every subcommand composes the same Hydra config tree, so the launcher, the trainer and the tools
take the same overrides. Errors in the user's input print as one line (LLMTRAIN_DEBUG=1 for a
traceback).
"""

from __future__ import annotations

import sys

from llmtrain import app

# subcommand -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("llmtrain.data.prepare:main", "train the tokenizer and tokenize the corpus into shards"),
    "train": ("llmtrain.train.trainer:main", "pretrain (one process, or every rank under `deepspeed`)"),
    "eval": (
        "llmtrain.eval.evaluate:main",
        "validation loss / perplexity / bits per byte of a checkpoint; downstream tasks with eval.tasks=[...]",
    ),
    "generate": ("llmtrain.generate:main", "sample text from a checkpoint"),
    "chat": ("llmtrain.chat:main", "talk with a fine-tuned checkpoint in the terminal (streaming)"),
    "export": ("llmtrain.export:main", "write a checkpoint as a Hugging Face model (safetensors)"),
    "checkpoint": ("llmtrain.train.universal:main", "convert a checkpoint to DeepSpeed's universal format"),
    "plan": (
        "llmtrain.plan:main",
        "memory per GPU for a model, ZeRO stage and batch; the largest micro batch that fits",
    ),
    "config": ("llmtrain.app:print_config", "print the composed config and exit"),
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


def run(command: str, argv: list[str]) -> int:
    if command not in COMMANDS:
        print(f"llmtrain: unknown command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[command]
    if command == "plan":
        argv = ["plan.json=true" if arg == "--json" else arg for arg in argv]
    return app.run(command, target, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
        print(USAGE.format(commands=lines))
        return 0 if argv else 2
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
