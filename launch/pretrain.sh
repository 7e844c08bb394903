#!/usr/bin/env bash
# launch/pretrain.sh [--config-dir DIR] [hydra overrides...]
#
# Pretrain with the `deepspeed` launcher running `python -m llmtrain.train <overrides>` on every rank.
# The overrides are the same as for `llmtrain train`, e.g.
#   launch/pretrain.sh model=llama_125m deepspeed=zero2 train.max_steps=5000 run.name=my-run
#
# Modes (picked from the environment):
#   one node, all its GPUs     launch/pretrain.sh ...            (GPUs counted by torch; honours
#                                                               CUDA_VISIBLE_DEVICES)
#   one node, no GPU           DeepSpeed's CPU accelerator with NPROC_PER_NODE gloo ranks (default 2),
#                              and `debug=cpu` (tiny fp32 model) prepended unless you pass a debug=...
#                              override yourself (`~debug` keeps the full default config);
#                              your other overrides, model=... included, still win.
#   many nodes over ssh/pdsh   HOSTFILE=hostfile launch/pretrain.sh ...   run once, on the first node
#                              (see launch/hostfile.example; passwordless ssh between the nodes)
#   one launch per node        NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/pretrain.sh ...  on node 0
#   (no ssh; SLURM, k8s)       NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/pretrain.sh ...  on node 1
#
# Environment:
#   NPROC_PER_NODE   ranks per node; default: the number of visible GPUs, or 2 without GPUs
#   NNODES           number of nodes for one-launch-per-node mode (default 1)
#   NODE_RANK        this node's index in [0, NNODES) (default 0)
#   MASTER_ADDR      address of node 0; required when NNODES > 1; optional with HOSTFILE
#   MASTER_PORT      rendezvous port (default 29500); set it to run two jobs on one machine
#   HOSTFILE         DeepSpeed hostfile ("host slots=N" lines). Alone: ssh/pdsh launch of every
#                    host from here. With NNODES > 1: names the nodes instead of the generated
#                    hostfile (node0..node<NNODES-1>, NPROC_PER_NODE slots each)
#   DS_ACCELERATOR   force DeepSpeed's accelerator (e.g. cpu); set to cpu when no GPU is found
#   OMP_NUM_THREADS  without GPUs, defaults to (CPU cores / ranks per node), at least 1
#   DEEPSPEED_ARGS   extra arguments for the deepspeed launcher, word-split
#                    (e.g. "--launcher openmpi" or "--enable_each_rank_log logs")
#   DRY_RUN=1        validate the config and print the deepspeed command instead of running it
#   LLMTRAIN_DEBUG=1 keep DeepSpeed's INFO logging (launcher and ranks) and show tracebacks
#
# The composed config (and the batch layout for the whole world) is checked once before any rank
# starts, so a misspelled key or an inconsistent batch size fails here, in a second, naming the key.
set -euo pipefail

die() {
    echo "pretrain.sh: error: $*" >&2
    exit 2
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
fi

command -v deepspeed >/dev/null || die "the deepspeed launcher is not on PATH (activate the environment first)"
PYTHON=$(command -v python || command -v python3) || die "python is not on PATH"

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES: must be a positive integer"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && ((NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK: must be in [0, NNODES=$NNODES)"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT=$MASTER_PORT: must be a port number"
if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$NPROC_PER_NODE: must be a positive integer"
fi

# --- accelerator and ranks per node ------------------------------------------------------------
if [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then
    num_gpus=0
elif [[ -z "${DS_ACCELERATOR:-}" ]] && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null && [[ ! -e /dev/kfd ]]; then
    num_gpus=0 # no NVIDIA or ROCm device nodes: skip importing torch
else
    num_gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi
overrides=("$@")
if ((num_gpus == 0)) && [[ -z "${DS_ACCELERATOR:-}" || "${DS_ACCELERATOR}" == "cpu" ]]; then
    export DS_ACCELERATOR=cpu
    ranks_per_node=${NPROC_PER_NODE:-2}
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        cores=$(nproc 2>/dev/null || echo 1)
        export OMP_NUM_THREADS=$((cores / ranks_per_node > 0 ? cores / ranks_per_node : 1))
    fi
    wants_debug=1
    for arg in "$@"; do
        [[ "$arg" =~ ^[+~]?debug(=|$) ]] && wants_debug=0
    done
    ((wants_debug)) && overrides=("debug=cpu" "$@")
    device="CPU"
else
    ranks_per_node=${NPROC_PER_NODE:-$num_gpus}
    ((ranks_per_node > 0)) || die "DS_ACCELERATOR=${DS_ACCELERATOR:-}: no devices found; set NPROC_PER_NODE"
    device="GPU"
fi

# --- launch mode -------------------------------------------------------------------------------
hostfile_slots() { # total slots and host count of a hostfile, ignoring comments and blank lines
    awk '!/^[[:space:]]*(#|$)/ { hosts++; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub("slots=", "", $i); slots += $i } }
         END { print slots + 0, hosts + 0 }' "$1"
}

ds_args=()
generated=""
if ((NNODES > 1)); then
    [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$NNODES needs MASTER_ADDR (the address of node 0)"
    if [[ -n "${HOSTFILE:-}" ]]; then
        [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE: no such file"
        hostfile=$HOSTFILE
    else
        # Same content on every node; a fixed name (no cleanup needed, so the launcher can be exec'd).
        dir="${TMPDIR:-/tmp}/llmtrain-$(id -u)"
        mkdir -p "$dir"
        hostfile="$dir/hostfile.${NNODES}x${ranks_per_node}"
        tmp=$(mktemp "$hostfile.XXXXXX")
        for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$ranks_per_node"; done >"$tmp"
        mv -f "$tmp" "$hostfile"
        generated=$hostfile
    fi
    read -r slots hosts < <(hostfile_slots "$hostfile")
    ((hosts == NNODES)) || die "HOSTFILE=$hostfile names $hosts hosts but NNODES=$NNODES"
    ds_args+=(--hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK"
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    mode="$NNODES nodes (this is node $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT)"
elif [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE: no such file"
    read -r slots hosts < <(hostfile_slots "$HOSTFILE")
    ((hosts > 0)) || die "HOSTFILE=$HOSTFILE names no hosts"
    ds_args+=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
    [[ -n "${MASTER_ADDR:-}" ]] && ds_args+=(--master_addr "$MASTER_ADDR")
    mode="$hosts nodes from $HOSTFILE over ssh"
else
    hosts=1
    slots=$ranks_per_node
    # Without NPROC_PER_NODE on GPUs, let DeepSpeed pick the visible devices (CUDA_VISIBLE_DEVICES).
    if [[ "$device" == "CPU" || -n "${NPROC_PER_NODE:-}" ]]; then
        ds_args+=(--num_gpus "$ranks_per_node")
    fi
    ds_args+=(--master_port "$MASTER_PORT")
    mode="1 node"
fi
if [[ -n "${NPROC_PER_NODE:-}" && -n "${HOSTFILE:-}" ]]; then
    ds_args+=(--num_gpus "$NPROC_PER_NODE") # overrides the hostfile's slots
    slots=$((hosts * NPROC_PER_NODE))
fi
world=$slots

# --- validate once, before any rank starts -----------------------------------------------------
"$PYTHON" - "$world" "${overrides[@]}" <<'PY'
import sys

from llmtrain.cli import split_args
from llmtrain.config import batch_layout, load_config
from llmtrain.errors import UserError

try:
    config_dir, overrides, _ = split_args(sys.argv[2:])
    cfg = load_config(overrides, config_dir=config_dir)
    glob, accum = batch_layout(cfg, int(sys.argv[1]))
except (UserError, ValueError) as err:  # Hydra raises ValueError for some malformed overrides
    print(f"pretrain.sh: error: {err}", file=sys.stderr)
    sys.exit(2)
print(f"pretrain.sh: run {cfg.run_dir}: global batch {glob} = micro {cfg.train.micro_batch_size} "
      f"x accumulation {accum} x world {sys.argv[1]}", file=sys.stderr)
PY

# The launcher's INFO lines (its command, world info, every rank's argv) would bury the progress
# output; its warnings and errors stay. LLMTRAIN_DEBUG=1 (or --log_level in DEEPSPEED_ARGS) shows all.
[[ -n "${LLMTRAIN_DEBUG:-}" ]] || ds_args+=(--log_level=warning)
# shellcheck disable=SC2206  # DEEPSPEED_ARGS is word-split on purpose
cmd=(deepspeed "${ds_args[@]}" ${DEEPSPEED_ARGS:-} --no_local_rank --module llmtrain.train "${overrides[@]}")
echo "pretrain.sh: $mode, $ranks_per_node $device rank(s) per node, world $world" \
    "(DS_ACCELERATOR=${DS_ACCELERATOR:-auto}${OMP_NUM_THREADS:+, OMP_NUM_THREADS=$OMP_NUM_THREADS})" >&2
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    if [[ -n "$generated" ]]; then sed "s|^|pretrain.sh: $generated: |" "$generated" >&2; fi
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}" # signals (Ctrl-C, scancel) go straight to the launcher, which stops its ranks
