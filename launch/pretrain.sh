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
#   MAX_RESTARTS     restart a failed run up to this many times (default 0: no restarts, and the
#                    launcher replaces this script, so signals reach it directly). A restart comes
#                    after a non-zero exit, except exit code 2 (a configuration or input error, which a
#                    restart cannot fix) and except when this script got SIGINT/SIGTERM: it passes
#                    those on to the launcher and all ranks, and stops. Restarts add resume=auto, so
#                    they continue from the newest verified checkpoint even when the first attempt
#                    was given resume=<path> or resume=none.
#   RESTART_DELAY_S  seconds to wait before a restart (default 5)
#   DRY_RUN=1        validate the config and print the deepspeed command instead of running it
#   LLMTRAIN_DEBUG=1 keep DeepSpeed's INFO logging (launcher and ranks) and show tracebacks
#
# The composed config (and the batch layout for the whole world) is checked once before any rank
# starts, so a misspelled key or an inconsistent batch size fails here, in a second, naming the key.
# Before each attempt, build locks left in torch's extension cache by a killed build of a DeepSpeed
# op are removed (with a warning), since every rank would otherwise wait for them forever.
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
MAX_RESTARTS=${MAX_RESTARTS:-0}
RESTART_DELAY_S=${RESTART_DELAY_S:-5}
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS: must be a non-negative integer"
[[ "$RESTART_DELAY_S" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "RESTART_DELAY_S=$RESTART_DELAY_S: must be a number of seconds"

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
"$PYTHON" -m llmtrain.preflight "$world" "${overrides[@]}" # exits 2 on a bad config

# The launcher's INFO lines (its command, world info, every rank's argv) would bury the progress
# output; its warnings and errors stay. LLMTRAIN_DEBUG=1 (or --log_level in DEEPSPEED_ARGS) shows all.
[[ -n "${LLMTRAIN_DEBUG:-}" ]] || ds_args+=(--log_level=warning)
# shellcheck disable=SC2206  # DEEPSPEED_ARGS is word-split on purpose
cmd=(deepspeed "${ds_args[@]}" ${DEEPSPEED_ARGS:-} --no_local_rank --module llmtrain.train "${overrides[@]}")
restarts=""
if ((MAX_RESTARTS > 0)); then restarts=", up to $MAX_RESTARTS restart(s)"; fi
echo "pretrain.sh: $mode, $ranks_per_node $device rank(s) per node, world $world" \
    "(DS_ACCELERATOR=${DS_ACCELERATOR:-auto}${OMP_NUM_THREADS:+, OMP_NUM_THREADS=$OMP_NUM_THREADS})$restarts" >&2
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    if [[ -n "$generated" ]]; then sed "s|^|pretrain.sh: $generated: |" "$generated" >&2; fi
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
# Stale build locks and shared-memory segments of killed runs. A lock younger than 10 minutes is
# kept: a build on another node may be using a shared cache.
"$PYTHON" -m llmtrain.distributed.leftovers
if ((MAX_RESTARTS == 0)); then
    exec "${cmd[@]}" # signals (Ctrl-C, scancel) go straight to the launcher, which stops its ranks
fi

# --- run, restarting after failures ------------------------------------------------------------
child=""
stop_signal=""
signals=0
forward() { # pass a signal this script got to the launcher and every rank, then stop
    stop_signal=$1
    signals=$((signals + 1))
    [[ -z "$child" ]] || kill -s "$1" -- "-$child" 2>/dev/null || true
}
stop_if_signalled() {
    if [[ -n "$stop_signal" ]]; then
        echo "pretrain.sh: stopped by SIG$stop_signal; not restarting" >&2
        exit $((128 + $(kill -l "$stop_signal")))
    fi
}
trap 'forward INT' INT
trap 'forward TERM' TERM
attempts=$((MAX_RESTARTS + 1))
run=("${cmd[@]}")
for ((attempt = 1; ; attempt++)); do
    # The launcher in its own process group (job control on for this one command): a forwarded
    # signal reaches it and all its ranks, and SIGINT is not ignored as in a plain background job.
    set -m
    "${run[@]}" &
    child=$!
    set +m
    while :; do # `wait` returns early when a trapped signal arrives: then wait again for the exit
        seen=$signals
        rc=0
        wait "$child" || rc=$?
        ((signals != seen)) || break
    done
    # On a signal DeepSpeed's runner exits at once while its ranks still save: wait for them all, so
    # a scheduler that sees this script end does not kill a checkpoint half-way.
    while kill -0 -- "-$child" 2>/dev/null; do sleep 0.5; done
    child=""
    stop_if_signalled
    ((rc != 0)) || exit 0
    if ((rc == 2)); then
        echo "pretrain.sh: attempt $attempt/$attempts failed with exit code 2 (a configuration or input" \
            "error; a restart cannot fix it)" >&2
        exit 2
    fi
    if ((attempt == attempts)); then
        echo "pretrain.sh: attempt $attempt/$attempts failed with exit code $rc; no restarts left" >&2
        exit "$rc"
    fi
    echo "pretrain.sh: attempt $attempt/$attempts failed with exit code $rc; restarting from the newest" \
        "verified checkpoint (resume=auto)" >&2
    sleep "$RESTART_DELAY_S" &
    sleeper=$!
    wait "$sleeper" || kill "$sleeper" 2>/dev/null || true # returns at once on SIGINT/SIGTERM
    stop_if_signalled
    run=("${cmd[@]}" resume=auto) # the newest checkpoint, also when the user named one
    if [[ "$NNODES" == 1 && -z "${HOSTFILE:-}" ]]; then
        # one node: the attempt that just ended was this job's only builder, and /proc sees all of it
        "$PYTHON" -m llmtrain.distributed.leftovers --min-age-s 0
    else
        "$PYTHON" -m llmtrain.distributed.leftovers
    fi
done
