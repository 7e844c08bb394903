"""`python -m llmtrain.train [overrides]`: the entry the deepspeed launcher runs on every rank."""

import sys

from llmtrain import app

sys.exit(app.run("train", "llmtrain.train.trainer:main", sys.argv[1:]))
