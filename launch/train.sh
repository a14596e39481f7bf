#!/usr/bin/env bash
# Thin torchrun wrapper for moe-train.
#
#   launch/train.sh NPROC [hydra overrides...]
#
# Single node (default): a standalone rendezvous on a free local port.
# Multi-node, run once per node with either
#   static:  NNODES=4 NODE_RANK=0..3 MASTER_ADDR=head MASTER_PORT=29500
#   c10d:    NNODES=4 RDZV_ENDPOINT=head:29400 [RDZV_ID=job-id]   (same command on every node)
# Other environment:
#   PYTHON         interpreter (default: python, so an activated venv is used)
#   OMP_NUM_THREADS  default: CPU cores / NPROC (at least 1)
#   TORCHRUN_ARGS  extra torchrun flags, e.g. "--max-restarts=3 --log-dir=logs"
#   DRY_RUN=1      print the command and exit
# The app picks NCCL on GPUs and gloo on CPUs, so the same command runs on a laptop.
set -euo pipefail

usage() {
    cat >&2 <<'USAGE'
usage: launch/train.sh NPROC [hydra overrides...]
  NPROC  processes per node (GPUs per node; any number on CPU)
example: launch/train.sh 8 router=sam model=base
multi-node: set NNODES with NODE_RANK + MASTER_ADDR [+ MASTER_PORT], or RDZV_ENDPOINT [+ RDZV_ID]
USAGE
    exit 2
}

die() {
    echo "launch/train.sh: $*" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in -h | --help) usage ;; esac
[[ "$1" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$1' (try --help)"
nproc_per_node=$1
shift

python=${PYTHON:-python}
nnodes=${NNODES:-1}

rdzv=()
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rdzv=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT"
        --rdzv-id="${RDZV_ID:-moe-train}")
elif [[ -n "${MASTER_ADDR:-}" || "$nnodes" != 1 ]]; then
    [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$nnodes needs MASTER_ADDR (and NODE_RANK) or RDZV_ENDPOINT"
    [[ -n "${NODE_RANK:-}" || "$nnodes" == 1 ]] || die "NNODES=$nnodes with MASTER_ADDR needs NODE_RANK"
    rdzv=(--nnodes="$nnodes" --node-rank="${NODE_RANK:-0}" --master-addr="$MASTER_ADDR"
        --master-port="${MASTER_PORT:-29500}")
else
    rdzv=(--standalone)
fi

extra=()
if [[ -n "${TORCHRUN_ARGS:-}" ]]; then
    read -r -a extra <<<"$TORCHRUN_ARGS"
fi

# Without this torchrun forces 1 thread per process; share the cores instead.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    threads=$((cores / nproc_per_node))
    OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi
export OMP_NUM_THREADS

# Run this checkout's moe_train even when it is not pip-installed.
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

cmd=("$python" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node="$nproc_per_node"
    "${extra[@]}" -m moe_train.train "$@")

printf '+ OMP_NUM_THREADS=%s' "$OMP_NUM_THREADS"
printf ' %q' "${cmd[@]}"
printf '\n'
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    exit 0
fi
exec "${cmd[@]}"
