#!/usr/bin/env bash
# Single machine, local data:  bash run_pretrain.sh [CONFIG.yaml] [--any_field value ...]
#   CONFIG defaults to configs/pretrain_tiny.yaml (a tiny model on the bundled data/, a few CPU minutes).
#   No GPU: trains on the CPU. One GPU: uses it. Several GPUs: one process per GPU through
#   torchrun/run_torchrun.sh (DDP); NUM_GPUS=N uses N of them (1: the first one; 0: the CPU).
#   A Mac's GPU (MPS) only with NUM_GPUS=1 (untested here); by default a Mac trains on the CPU.
#   DeepSpeed ZeRO: deepspeed/run_deepspeed.sh.
#   Paths in configs are relative to the repository root. PYTHON: the interpreter (default python3, else python).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"  # started with sh (dash has no pipefail)
set -euo pipefail
CONFIG=configs/pretrain_tiny.yaml
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then CONFIG=$1; shift; fi
[ -f "$CONFIG" ] && CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
[[ "${PYTHON:-}" == */* ]] && export PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")  # from the caller's directory
export PRETRAIN_CALLER_DIR=${PRETRAIN_CALLER_DIR:-$PWD}  # named in errors about relative paths
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-$(command -v python3 || command -v python || true)}
[ -n "$PYTHON" ] || { echo "run_pretrain.sh: no python3 or python on PATH: activate the environment the requirements were installed into (README), or set PYTHON=/path/to/python" >&2; exit 2; }
read -r GPUS MPS <<< "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count(), int(torch.backends.mps.is_available()))' 2>/dev/null || echo 0 0)"
NUM_GPUS=${NUM_GPUS:-$GPUS}
[[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || { echo "run_pretrain.sh: NUM_GPUS must be a whole number, got '$NUM_GPUS'" >&2; exit 2; }
if [ "$GPUS" -gt 0 ] && [ "$NUM_GPUS" -gt "$GPUS" ]; then
    echo "run_pretrain.sh: NUM_GPUS=$NUM_GPUS but this machine has $GPUS GPU(s) visible" >&2; exit 2
fi
if [ "$NUM_GPUS" -gt 1 ]; then
    echo "run_pretrain.sh: $NUM_GPUS processes (DDP$([ "$GPUS" -eq 0 ] && echo ", on the CPU")) through torchrun/run_torchrun.sh"
    NPROC_PER_NODE=$NUM_GPUS exec bash torchrun/run_torchrun.sh "$CONFIG" "$@"
fi
if [ "$GPUS" -gt "$NUM_GPUS" ]; then
    # one process sees one GPU (with several the Trainer would split each batch over them with DataParallel);
    # NUM_GPUS=0 hides them all: the CPU trains
    VISIBLE=${CUDA_VISIBLE_DEVICES:-0}
    export CUDA_VISIBLE_DEVICES=$([ "$NUM_GPUS" -eq 1 ] && echo "${VISIBLE%%,*}")
fi
CPU=()
if [ "$NUM_GPUS" -eq 0 ] && [ "$MPS" = 1 ]; then  # transformers would pick the Apple GPU by itself
    echo "run_pretrain.sh: training on the CPU; NUM_GPUS=1 trains on this Mac's GPU (MPS, untested here)"
    CPU=(--use_cpu true)
fi
exec "$PYTHON" pretrain.py "$CONFIG" ${CPU[@]+"${CPU[@]}"} "$@"
