#!/usr/bin/env bash
# One command, under 8 minutes on one H100: training tokens/s and MFU of the Qwen2-0.5B shape (vocab 151936,
# bf16, sdpa, fused AdamW) at sequence 2048 and 4096, read from each run's metrics.json (ThroughputMeter:
# eval and checkpoint time excluded; MFU = 6N + 12 L H Q S FLOPs per token over the card's dense bf16 peak).
# Each run prints its steady state (after the first logging window: start-up, autotuning and compilation
# excluded) and its whole-run figure.
#   bash bench/gpu_bench.sh [--torch_compile true] [--use_liger_kernel true] [...any pretrain.py flag]
# Environment: SEQS (default "2048 4096"), BATCH_TOKENS per micro-batch (default 16384), STEPS (60), OUT_DIR.
# On a machine without datasets/deepspeed (the lent GPU boxes) nothing here imports them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT_DIR:-outputs/gpu_bench}
mkdir -p "$(dirname "$OUT")"
STEPS=${STEPS:-60}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
# The bundled data without eval splits: at 4096 tokens a 5% split of data/ is shorter than one block.
SOURCES='[{name: medical, path: data/medical_zh.txt, eval_fraction: 0}, {name: general, path: data/general_zh.txt, eval_fraction: 0},
          {name: articles, path: data/medical_articles.jsonl, eval_fraction: 0}]'
for SEQ in ${SEQS:-2048 4096}; do
    BATCH=$(( ${BATCH_TOKENS:-16384} / SEQ ))
    "$PYTHON" pretrain.py configs/gpu_qwen2_0.5b.yaml --sources "$SOURCES" --model_vocab_size 151936 --block_size "$SEQ" \
        --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps 1 --max_steps "$STEPS" \
        --eval_strategy no --eval_on_start false --save_strategy no --report_to none --sample_prompts "" \
        --verify_saved_model false --logging_steps 10 --output_dir "$OUT/seq$SEQ" "$@" > "$OUT-seq$SEQ.log" 2>&1 \
        || { tail -30 "$OUT-seq$SEQ.log"; exit 1; }
    "$PYTHON" - "$OUT/seq$SEQ/metrics.json" "$SEQ" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["train"]
def line(label, f):
    mfu = f"MFU {f['mfu']:.1%}" if "mfu" in f else "MFU n/a (unknown GPU: pass --peak_tflops)"
    return (f"seq {sys.argv[2]} {label}: {f['tokens_per_second']:,.0f} tokens/s, {f['step_time_s']:.3f} s/step, {mfu}, "
            f"peak memory {f['peak_memory_gib']:.1f} GiB, data wait {f['data_wait_share']:.1%}")
steady = m.get("steady_state")
if steady:
    print(line(f"steady (steps {steady['from_step']}-{m['steps']})", steady))
print(line(f"whole run (steps 0-{m['steps']})", m))
PY
done
