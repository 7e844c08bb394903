#!/usr/bin/env bash
# One call's worth of GPU checks for a lent H100 / H200 (see shared/device/README.md), in under
# 8 minutes: installs the wheels the machine lacks (./.whl, from shared/device/fetch_wheels.sh),
# prints the GPU, driver, torch and CUDA versions, runs the tests that need a GPU (the compiled
# Triton kernel cases, the kernel references, the MFU table, a training step with no host sync, pinned
# batches), a llama_125m run under torch's sync-debug mode, then bench/throughput.py for
# llama_125m at 1K context and llama_1b at 4K context in bf16 with the fused kernels (and, while
# time is left, with torch.compile instead). Every step has a hard `timeout` and the whole script a
# deadline (BUDGET_S); full logs and the JSON of each benchmark go to $OUT; a short table comes last.
#
#   bash bench/gpu_check.sh                    # on the GPU machine (device tool: carry [".whl"])
#   DRY_RUN=1 bash bench/gpu_check.sh          # anywhere: print every command, check files and presets
#
# Environment: OUT (default ./gpu_check_out), BUDGET_S (default 450), PYTHON (default python3),
# STEPS / WARMUP of each benchmark (default 20 / 5).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./gpu_check_out}
DRY_RUN=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-450}
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
VOCAB=32000 # a Llama-2-sized tokenizer trained on the built-in stdlib corpus (no download)
DATA=.cache/bench/stdlib_v$VOCAB
DEADLINE=$(($(date +%s) + BUDGET_S))
SUMMARY=()
PROBLEMS=0

say() { printf '%s\n' "$*"; }

# need_file PATH: a file or folder the checks use must exist (a dry run says which is missing).
need_file() {
  if [[ ! -e $1 ]]; then
    say "MISSING: $1"
    PROBLEMS=$((PROBLEMS + 1))
  fi
}

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, its output in $OUT/NAME.log; the limit
# shrinks to what is left of the deadline, and a step that would get under 20 s is skipped.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    say "-- $name: skipped (budget spent)"
    SUMMARY+=("$name: skipped")
    return 0
  fi
  say "-- $name (limit ${limit} s): $*"
  if [[ $DRY_RUN == 1 ]]; then
    SUMMARY+=("$name: dry run")
    return 0
  fi
  local start=$SECONDS rc=0
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - start)) verdict=ok
  ((rc == 124 || rc == 137)) && verdict="TIMED OUT"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED rc=$rc"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
  SUMMARY+=("$name: $verdict (${took} s)")
  [[ $verdict == ok ]] || PROBLEMS=$((PROBLEMS + 1))
}

# bench NAME OVERRIDES...: bench/throughput.py on the prepared corpus, JSON into $OUT/NAME.json.
bench() {
  local name=$1
  shift
  step "$name" 150 "$PYTHON" bench/throughput.py --data-dir "$DATA" --warmup "$WARMUP" --steps "$STEPS" \
    --out "$OUT/$name.json" "$@"
}

mkdir -p "$OUT"
say "== gpu_check: logs in $OUT, budget ${BUDGET_S} s$([[ $DRY_RUN == 1 ]] && echo ', DRY RUN')"

# -- what the checks need, present in this checkout
for path in bench/throughput.py tests/kernels tests/kernels/triton_cases.py tests/kernels/test_kernels_reference.py \
  tests/kernels/test_kernels_triton.py tests/model/test_flops.py configs/data/stdlib.yaml; do
  need_file "$path"
done
for preset in llama_125m llama_1b; do
  need_file "configs/model/$preset.yaml"
done

# -- the wheels the GPU image lacks (deepspeed, hydra-core, omegaconf, ...); this checkout on PYTHONPATH
INSTALL=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site")
if compgen -G ".whl/*.whl" >/dev/null; then
  say "-- install: ${INSTALL[*]} .whl/*.whl"
  if [[ $DRY_RUN != 1 ]]; then
    "${INSTALL[@]}" .whl/*.whl >"$OUT/install.log" 2>&1 || say "   install failed: see $OUT/install.log"
  fi
else
  say "-- install: no ./.whl here (run ../shared/device/fetch_wheels.sh before lending a GPU)"
  [[ $DRY_RUN == 1 ]] || PROBLEMS=$((PROBLEMS + 1))
fi
export PYTHONPATH="$HOME/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled
# The ini's addopts name pytest-timeout, which the GPU image may lack; also read by the tests' own
# child pytest runs.
export PYTEST_ADDOPTS="-o addopts="

# -- the benchmarks, NAME and overrides: best settings first, torch.compile variants while time is left
BF16="train.precision=bf16 deepspeed.zero_stage=1"
KERNELS="model.kernels=[rmsnorm,swiglu,fused_ce]"
M125="model=llama_125m train.seq_len=1024 train.micro_batch_size=32 $BF16"
M1B="model=llama_1b train.seq_len=4096 train.micro_batch_size=4 $BF16"
BENCHES=(
  "llama_125m_1k_kernels $M125 $KERNELS"
  "llama_1b_4k_kernels $M1B $KERNELS"
  "llama_125m_1k_compile $M125 model.compile=true"
  "llama_1b_4k_compile $M1B model.compile=true"
)
SYNC_FREE="sync_free $M125 $KERNELS train.sync_debug=error"
if [[ $DRY_RUN == 1 ]]; then # every benchmark's overrides must compose (a typo fails here, not on the GPU)
  COMPOSE='import shlex, sys
from llmtrain.config import load_config
for entry in sys.argv[1:]:
    load_config(shlex.split(entry)[1:])'
  if ! "$PYTHON" -c "$COMPOSE" "${BENCHES[@]}" 2>"$OUT/compose.log"; then
    say "DOES NOT COMPOSE: $(tail -n 1 "$OUT/compose.log")"
    PROBLEMS=$((PROBLEMS + 1))
  fi
fi

say "-- versions"
if [[ $DRY_RUN == 1 ]]; then
  say "   nvidia-smi; $PYTHON -c 'torch / CUDA / GPU / triton / deepspeed versions'"
else
  nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -n 15
  "$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "deepspeed", "hydra", "omegaconf"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, "not importable:", err)
EOF
fi

if [[ $DRY_RUN != 1 ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  say "== no CUDA device visible to torch: stopping (DRY_RUN=1 checks this script without a GPU)"
  exit 1
fi

# -- tests that need a GPU: the Triton kernels compiled (not interpreted) against their references,
# the PyTorch references and fallback, the sm_90 compile check, the MFU table on this device. The
# interpreter run of the same cases is CPU work the CI already does.
step tests 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels/triton_cases.py tests/kernels \
  tests/model/test_flops.py tests/train/test_host_sync.py tests/data/test_loader.py::test_prefetch_pins_batches_for_the_gpu \
  --deselect tests/kernels/test_kernels_triton.py::test_triton_kernels_match_references_under_interpreter

# -- the corpus the benchmarks train on (the model's vocabulary is the tokenizer's)
step prepare 120 "$PYTHON" -m llmtrain prepare data=stdlib "data.dir=$DATA" "tokenizer.vocab_size=$VOCAB" \
  prepare.progress=false

for entry in "${BENCHES[@]:0:2}"; do # the two MFU targets first
  # shellcheck disable=SC2086  # NAME and the overrides, split on spaces on purpose
  bench $entry
done

# -- no host synchronisation inside a training step of the real preset: torch fails the run at the
# first one (train.sync_debug=error), its stack in the log
# shellcheck disable=SC2086  # the overrides, split on spaces on purpose
step sync_free 100 "$PYTHON" bench/throughput.py --data-dir "$DATA" --warmup 2 --steps 6 ${SYNC_FREE#sync_free }

for entry in "${BENCHES[@]:2}"; do
  # shellcheck disable=SC2086
  bench $entry
done

say "== steps"
for line in "${SUMMARY[@]}"; do say "   $line"; done
if [[ $DRY_RUN == 1 ]]; then
  say "== dry run: $PROBLEMS problem(s)"
  exit $((PROBLEMS > 0))
fi
say "== throughput (vocab $VOCAB; tokens/s per device, MFU against the dense bf16 peak, peak CUDA memory)"
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
from throughput import table
results = []
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    for r in json.loads(path.read_text())["results"]:
        results.append({**r, "label": path.stem})
print(table(results) if results else "no benchmark finished")
EOF
exit $((PROBLEMS > 0))
