#!/usr/bin/env bash
# torchrun launcher (DDP, or FSDP with FSDP=1), one node or several:
#   bash torchrun/run_torchrun.sh [CONFIG.yaml] [--any_field value ...]
# Environment:
#   NPROC_PER_NODE  processes per node (default: the GPU count; 2 on a machine without GPUs)
#   NNODES          nodes (default 1)      NODE_RANK   this node's rank (required when NNODES > 1)
#   MASTER_ADDR     node 0's address       MASTER_PORT its port (default 29500)
#   RDZV_ENDPOINT   host:port for c10d rendezvous instead of MASTER_ADDR/NODE_RANK (elastic, any start order)
#   FSDP=1          shard parameters, gradients and optimizer state (FSDP2, one unit per decoder layer;
#                   torchrun/fsdp_config.json)
#   DS_CONFIG       DeepSpeed ZeRO config instead (deepspeed/ds_zero*.json; deepspeed/run_deepspeed.sh sets it)
#   MAX_RESTARTS    restart all processes this many times after one fails (default 0); needs
#                   --resume_from_checkpoint auto: each start continues from the newest complete checkpoint.
#                   Each attempt gets a fresh store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; several nodes use the c10d
#                   rendezvous at MASTER_ADDR:MASTER_PORT): on torchrun's shared store a restart can read the dead
#                   attempt's addresses and hang in init_process_group (pytorch#135712)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun lets the ranks finish after it passes on SIGTERM (a scheduler
#                   preempting the job: they save a checkpoint at the next step) before it kills them (default here
#                   300; torch's own is 30, too short to save a large model; read by torch >= 2.11)
#   PYTHON          the interpreter (default python3, else python)
# Without CUDA the processes train on the CPU over gloo (--use_cpu true: otherwise each rank trains alone).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"  # started with sh (dash has no pipefail)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=$ROOT/configs/pretrain_tiny.yaml
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then CONFIG=$1; shift; fi
[ -f "$CONFIG" ] && CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")  # else pretrain.py names it
# a DeepSpeed config relative to where the command runs, else to the repository (deepspeed/ds_zero2.json)
[ -n "${DS_CONFIG:-}" ] && [ -f "$DS_CONFIG" ] && DS_CONFIG=$(cd "$(dirname "$DS_CONFIG")" && pwd)/$(basename "$DS_CONFIG")
[[ "${PYTHON:-}" == */* ]] && export PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")  # from the caller's directory
export PRETRAIN_CALLER_DIR=${PRETRAIN_CALLER_DIR:-$PWD}  # named in errors about relative paths
cd "$ROOT"
PYTHON=${PYTHON:-$(command -v python3 || command -v python || true)}
[ -n "$PYTHON" ] || { echo "run_torchrun.sh: no python3 or python on PATH: activate the environment the requirements were installed into, or set PYTHON=/path/to/python" >&2; exit 2; }
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-0}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
for name in NPROC_PER_NODE NNODES; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || { echo "run_torchrun.sh: $name must be a whole number of at least 1, got '${!name}'" >&2; exit 2; }
done
for name in MAX_RESTARTS TORCH_ELASTIC_SHUTDOWN_TIMEOUT; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || { echo "run_torchrun.sh: $name must be a whole number, got '${!name}'" >&2; exit 2; }
done
case "${FSDP:-0}" in
    1|true|yes) FSDP=1 ;;
    0|false|no|"") FSDP=0 ;;
    *) echo "run_torchrun.sh: FSDP must be 1 (on) or 0 (off), got '$FSDP'" >&2; exit 2 ;;
esac
EXTRA=()
[ "$GPUS" -eq 0 ] && EXTRA+=(--use_cpu true)
[ "$FSDP" = 1 ] && EXTRA+=(--fsdp true --fsdp_config torchrun/fsdp_config.json)
[ -n "${DS_CONFIG:-}" ] && EXTRA+=(--deepspeed "$DS_CONFIG")
if [ "$NNODES" -gt 1 ] && [ "$MAX_RESTARTS" -gt 0 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
    RDZV_ENDPOINT=${MASTER_ADDR:?set MASTER_ADDR to node 0}:${MASTER_PORT:-29500}  # the static rendezvous always shares its store
fi
if [ -n "${RDZV_ENDPOINT:-}" ]; then
    LAUNCH=(--nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT"
            --rdzv_id "${RDZV_ID:-pretrain}")
elif [ "$NNODES" -gt 1 ]; then
    LAUNCH=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK on each node}" --nproc_per_node "$NPROC_PER_NODE"
            --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master_port "${MASTER_PORT:-29500}")
else
    LAUNCH=(--standalone --nproc_per_node "$NPROC_PER_NODE")
fi
[ "$MAX_RESTARTS" -gt 0 ] && export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
echo "run_torchrun.sh: ${NNODES} node(s) x ${NPROC_PER_NODE} process(es), $([ "$GPUS" -gt 0 ] && echo GPU || echo CPU/gloo)$([ "$FSDP" = 1 ] && echo ", FSDP")${DS_CONFIG:+, DeepSpeed $DS_CONFIG}"
exec "$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" --max_restarts "$MAX_RESTARTS" pretrain.py "$CONFIG" ${EXTRA[@]+"${EXTRA[@]}"} "$@"
