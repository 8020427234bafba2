#!/usr/bin/env bash
# Single machine, local data:  bash run_pretrain.sh [CONFIG.yaml] [--any_field value ...]
#   CONFIG defaults to configs/pretrain_tiny.yaml (a tiny model on the bundled data/, a few CPU minutes).
#   No GPU: trains on the CPU. One GPU: uses it. Several GPUs: one process per GPU through
#   torchrun/run_torchrun.sh (DDP); set NUM_GPUS to use fewer. DeepSpeed ZeRO: deepspeed/run_deepspeed.sh.
#   Paths in configs are relative to the repository root.
set -euo pipefail
CONFIG=configs/pretrain_tiny.yaml
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then CONFIG=$1; shift; fi
[ -f "$CONFIG" ] && CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python}
NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}
if [ "$NUM_GPUS" -gt 1 ]; then
    echo "run_pretrain.sh: $NUM_GPUS GPUs found, handing over to torchrun/run_torchrun.sh (DDP, one process per GPU)"
    NPROC_PER_NODE=$NUM_GPUS exec bash torchrun/run_torchrun.sh "$CONFIG" "$@"
fi
exec "$PYTHON" pretrain.py "$CONFIG" "$@"
