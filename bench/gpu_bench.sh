#!/usr/bin/env bash
# One command, under 8 minutes on one H100: training tokens/s and MFU of the Qwen2-0.5B shape (vocab 151936,
# bf16, sdpa, fused AdamW) at sequence 2048 and 4096, read from each run's metrics.json (ThroughputMeter:
# eval and checkpoint time excluded; MFU = 6N + 12 L d S FLOPs per token over the card's dense bf16 peak).
#   bash bench/gpu_bench.sh [--torch_compile true] [--use_liger_kernel true] [...any pretrain.py flag]
# On a machine without datasets/deepspeed (the lent GPU boxes) nothing here imports them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT_DIR:-outputs/gpu_bench}
STEPS=${STEPS:-60}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for SEQ in 2048 4096; do
    BATCH=$(( 16384 / SEQ ))   # 16k tokens per micro-batch
    "$PYTHON" pretrain.py configs/gpu_qwen2_0.5b.yaml --model_vocab_size 151936 --block_size "$SEQ" \
        --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps 1 --max_steps "$STEPS" \
        --eval_strategy no --eval_on_start false --save_strategy no --report_to none --sample_prompts "" \
        --verify_saved_model false --logging_steps 10 --output_dir "$OUT/seq$SEQ" "$@" > "$OUT-seq$SEQ.log" 2>&1 \
        || { tail -30 "$OUT-seq$SEQ.log"; exit 1; }
    "$PYTHON" - "$OUT/seq$SEQ/metrics.json" "$SEQ" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["train"]
mfu = m.get("mfu")
print(f"seq {sys.argv[2]}: {m['tokens_per_second']:,.0f} tokens/s, {m['step_time_s']:.3f} s/step, "
      f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a (unknown GPU: pass --peak_tflops)",
      f", peak memory {m['peak_memory_gib']:.1f} GiB, data wait {m['data_wait_share']:.1%}")
PY
done
