#!/usr/bin/env bash
# DeepSpeed ZeRO launcher, one node or several:
#   bash deepspeed/run_deepspeed.sh [CONFIG.yaml] [--any_field value ...]
# Environment:
#   DS_CONFIG    ZeRO config (default deepspeed/ds_zero2.json): ds_zero1 / ds_zero2 / ds_zero3 /
#                ds_zero2_offload / ds_zero3_offload .json
#   NUM_GPUS     processes per node (default: the GPU count, 2 on a machine without GPUs; with HOSTFILE the
#                hostfile's slots)
#   HOSTFILE     several nodes: a DeepSpeed hostfile ("node1 slots=8" per line), launched over ssh/pdsh by
#                the `deepspeed` launcher from node 0 (run it from the repository root, which must be at the
#                same path on every node); MASTER_ADDR (default: the first host), MASTER_PORT (default 29500)
#   DS_LAUNCHER_ARGS  more options for the deepspeed launcher with HOSTFILE, e.g. "--launcher openmpi" or
#                "--ssh_port 2222"
#   PYTHON       the interpreter (default python3, else python); with HOSTFILE the same path on every node
# With HOSTFILE, HF_*, TRANSFORMERS_*, TORCH_EXTENSIONS_DIR, TOKENIZERS_PARALLELISM and WANDB_* variables reach
# the other nodes too (the launcher alone passes on only PYTHON*, NCCL*, ... and ~/.deepspeed_env's lines).
# One node goes through torchrun/run_torchrun.sh (also the way to run single-process DeepSpeed), which
# trains on the CPU over gloo when there is no CUDA (--use_cpu true: otherwise each rank trains alone).
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"  # started with sh (dash has no pipefail)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DS_CONFIG=${DS_CONFIG:-deepspeed/ds_zero2.json}
if [ -n "${NUM_GPUS:-}" ] && ! [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "run_deepspeed.sh: NUM_GPUS must be a whole number of at least 1, got '$NUM_GPUS'" >&2; exit 2
fi
if [ -z "${HOSTFILE:-}" ]; then
    [ -n "${NUM_GPUS:-}" ] && export NPROC_PER_NODE=$NUM_GPUS
    exec bash "$ROOT/torchrun/run_torchrun.sh" "$@"
fi
CONFIG=$ROOT/configs/pretrain_tiny.yaml
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then CONFIG=$1; shift; fi
[ -f "$CONFIG" ] && CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")  # else pretrain.py names it
[ -f "$HOSTFILE" ] || { echo "run_deepspeed.sh: HOSTFILE $HOSTFILE does not exist" >&2; exit 2; }
HOSTFILE=$(cd "$(dirname "$HOSTFILE")" && pwd)/$(basename "$HOSTFILE")
[ -f "$DS_CONFIG" ] && DS_CONFIG=$(cd "$(dirname "$DS_CONFIG")" && pwd)/$(basename "$DS_CONFIG")
[[ "${PYTHON:-}" == */* ]] && export PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")  # from the caller's directory
export PRETRAIN_CALLER_DIR=${PRETRAIN_CALLER_DIR:-$PWD}  # named in errors about relative paths
cd "$ROOT"
PYTHON=${PYTHON:-$(command -v python3 || command -v python || true)}
[ -n "$PYTHON" ] || { echo "run_deepspeed.sh: no python3 or python on PATH: activate the environment the requirements were installed into, or set PYTHON=/path/to/python" >&2; exit 2; }
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
LAUNCHER=(--hostfile "$HOSTFILE" --no_local_rank)  # --local_rank=N before the config path would hide it
[ -n "${NUM_GPUS:-}" ] && LAUNCHER+=(--num_gpus "$NUM_GPUS")
read -r -a MORE <<< "${DS_LAUNCHER_ARGS:-}"
EXTRA=()
[ "$GPUS" -eq 0 ] && EXTRA+=(--use_cpu true)
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
# The deepspeed launcher hands the other nodes only variables named PYTHON*, NCCL*, UCX*, ... and the lines of a
# .deepspeed_env file: add the hub and build settings (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, TORCH_EXTENSIONS_DIR,
# ...) to the user's own ~/.deepspeed_env and ./.deepspeed_env lines, in a private file the launcher reads at
# start; it is removed a minute later (it may hold a token).
ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/deepspeed_env.XXXXXX")
for own in ~/.deepspeed_env ./.deepspeed_env; do
    if [ -f "$own" ]; then grep '=' "$own" >> "$ENV_FILE" || true; fi
done
# The launcher sends each as `export NAME="VALUE";` through the other nodes' shell: a value holding $, `, " or \
# would run there as code (WANDB_NOTES='lr $(...)'), so such values are not forwarded.
UNSAFE='[$`"\\]'
while IFS= read -r -d '' pair; do
    if [[ "${pair%%=*}" =~ ^((HF|HUGGINGFACE|TRANSFORMERS|WANDB)_[A-Za-z0-9_]+|TORCH_EXTENSIONS_DIR|TOKENIZERS_PARALLELISM)$ \
          && "$pair" != *$'\n'* ]]; then
        if [[ "${pair#*=}" =~ $UNSAFE ]]; then
            echo "run_deepspeed.sh: ${pair%%=*} is not passed to the other nodes: its value holds \$, \`, \" or \\, which their shell would run or change. Set it on each node (~/.deepspeed_env) without them." >&2
        else
            printf '%s\n' "$pair" >> "$ENV_FILE"
        fi
    fi
done < <(env -0)
export DS_ENV_FILE=$ENV_FILE  # an absolute path: the launcher's os.path.join keeps it
(sleep 60; rm -f "$ENV_FILE") >/dev/null 2>&1 &
echo "run_deepspeed.sh: nodes from $HOSTFILE, master $MASTER_ADDR:${MASTER_PORT:-29500}, $DS_CONFIG$([ "$GPUS" -eq 0 ] && echo ", CPU/gloo")"
exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCHER[@]}" ${MORE[@]+"${MORE[@]}"} --master_addr "$MASTER_ADDR" \
    --master_port "${MASTER_PORT:-29500}" pretrain.py "$CONFIG" --deepspeed "$DS_CONFIG" ${EXTRA[@]+"${EXTRA[@]}"} "$@"
