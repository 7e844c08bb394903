"""`python -m llmtrain.train [overrides]`: the entry the deepspeed launcher runs on every rank."""

import sys

from llmtrain.cli import run

sys.exit(run("train", sys.argv[1:]))
