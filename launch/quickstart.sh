#!/usr/bin/env bash
# launch/quickstart.sh [hydra overrides...]
#
# The README's first command (`make train` runs it): prepare the built-in stdlib corpus if needed
# (tokenizer + shards under data/stdlib), pretrain with DeepSpeed on every local device (CPU ranks
# where there is no GPU) into runs/quickstart, then print a short sample from the final checkpoint.
# Running it again resumes the run from its newest checkpoint (and stops at once when it is done).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== 1/3 prepare the built-in corpus (skipped when already done)"
llmtrain prepare "$@"
echo "== 2/3 pretrain"
bash launch/pretrain.sh experiment=quickstart "$@"
echo "== 3/3 sample from the trained model"
llmtrain generate experiment=quickstart generate.prompt="def " generate.max_new_tokens=80 "$@"
