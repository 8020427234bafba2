#!/usr/bin/env bash
# Single machine, open (hub) + local data:  bash run_pretrain2.sh [CONFIG.yaml] [--any_field value ...]
#   CONFIG defaults to configs/pretrain_open_mixed.yaml: WikiText-103 + shibing624/medical + data/, mixed by
#   tokens, per-domain eval perplexity. Hub access honours HF_ENDPOINT (a mirror), HF_TOKEN and HF_HUB_OFFLINE;
#   datasets downloaded to data/hub/OWNER/NAME are read from there; `modelscope:OWNER/NAME` models and datasets
#   come from ModelScope (MODELSCOPE_ENDPOINT). GPUs are used as in run_pretrain.sh.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"  # started with sh (dash has no pipefail)
set -euo pipefail
CONFIG=configs/pretrain_open_mixed.yaml
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then CONFIG=$1; shift; fi
[ -f "$CONFIG" ] && CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_pretrain.sh" "$CONFIG" "$@"
