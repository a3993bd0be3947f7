#!/bin/bash
# One-node launcher: torchrun --standalone with any number of local processes (GPUs, or CPU with --cpu).
#
#   launch/local/run.sh [-n NPROC] RECIPE [key=value ...] [--cpu]
#   NPROC=4 launch/local/run.sh recipes/tiny/adakd_tp2_pp2.yaml --cpu
#   DRY_RUN=1 launch/local/run.sh -n 2 recipes/tiny/csd_tp2.yaml     (prints the command only)
#
# NPROC defaults to 1. Arguments after RECIPE go to `distill run` unchanged. torchrun is taken from
# $TORCHRUN, else PATH, else the repository's .venv/bin.
set -euo pipefail

NPROC="${NPROC:-1}"
while getopts ":n:h" opt; do
    case "$opt" in
        n) NPROC="$OPTARG" ;;
        h) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "usage: $0 [-n NPROC] RECIPE [key=value ...] [--cpu]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [[ $# -lt 1 ]]; then
    echo "usage: $0 [-n NPROC] RECIPE [key=value ...] [--cpu]" >&2
    exit 2
fi
if [[ ! "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi
RECIPE="$1"
shift

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${TORCHRUN:-}" ]]; then
    if command -v torchrun >/dev/null 2>&1; then
        TORCHRUN=torchrun
    else
        TORCHRUN="$REPO/.venv/bin/torchrun"
    fi
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1

DISTRIBUTED_ARGS=(--standalone --nnodes 1 --nproc-per-node "$NPROC")
DISTILL_ARGS=(-m distill_plugins.cli run "$RECIPE" "$@")
CMD=("$TORCHRUN" "${DISTRIBUTED_ARGS[@]}" "${DISTILL_ARGS[@]}")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
exec "${CMD[@]}"
