#!/usr/bin/env bash
# The MFU levers of docs/BENCHMARKS.md, side by side on one GPU in one command (estimated 6-8 minutes on an H100):
# the 0.5B recipe at sequence 4096, each variant one bench/gpu_bench.sh run (pretrain.py, 30 steps), then a
# table of steady-state tokens/s, MFU and peak memory with each variant's ratio to the first (the recipe as
# shipped: bf16 autocast over fp32 weights). A variant that fails (out of memory, a compiler error) is
# reported as failed with its last error line, and the others still run.
#   bash bench/gpu_levers.sh            (VARIANTS="name|batch tokens|flags;..." to choose others)
# The Liger variants need liger-kernel (and the lent GPU machines an up-to-date transformers): carry the
# wheels as docs/BENCHMARKS.md says; without them those variants are reported as failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT_DIR:-outputs/gpu_levers}
SEQ=${SEQ:-4096}
BUDGET=${BUDGET_S:-540}  # seconds for all variants (SECONDS counts from this script's start)
DEFAULT="bf16 autocast|16384|;\
bf16_weights|16384|--mixed_precision bf16_weights;\
bf16_weights + compile blocks|16384|--mixed_precision bf16_weights --torch_compile true;\
bf16_weights + chunked loss, 32k-token micro-batch|32768|--mixed_precision bf16_weights --chunked_loss true;\
bf16_weights + chunked loss + compile blocks, 32k|32768|--mixed_precision bf16_weights --chunked_loss true --torch_compile true;\
bf16_weights + liger, 32k|32768|--mixed_precision bf16_weights --use_liger_kernel true"
IFS=';' read -ra VARIANTS <<< "${VARIANTS:-$DEFAULT}"
# the folder is emptied: refuse one that holds anything but this script's own outputs (OUT_DIR=outputs would
# delete every trained model)
foreign=$(ls -A "$OUT" 2>/dev/null | grep -Ev '^([0-9]+|[0-9]+\.name|[0-9]+-seq[0-9]+\.log)$' | head -1)
if [ -n "$foreign" ]; then
    echo "gpu_levers.sh: OUT_DIR $OUT holds $foreign, which this script did not write, and it empties OUT_DIR at each run: choose another OUT_DIR" >&2
    exit 2
fi
rm -rf "$OUT" && mkdir -p "$OUT"
i=0
for variant in "${VARIANTS[@]}"; do
    IFS='|' read -r name tokens flags <<< "$variant"
    echo "== $name (micro-batch $tokens tokens) $flags"
    echo "$name" > "$OUT/$i.name"
    left=$(( BUDGET - SECONDS ))  # the table must print inside the caller's limit: no variant runs past the budget
    if (( left < 30 )); then
        echo "skipped: under 30 s of the ${BUDGET} s budget left" | tee "$OUT/$i-seq$SEQ.log"
        i=$((i + 1)); continue
    fi
    limit=$(( left < ${VARIANT_TIMEOUT:-240} ? left : ${VARIANT_TIMEOUT:-240} ))
    # shellcheck disable=SC2086  # flags are words
    SEQS=$SEQ BATCH_TOKENS="$tokens" STEPS="${STEPS:-30}" OUT_DIR="$OUT/$i" \
        timeout -s KILL "$limit" bash bench/gpu_bench.sh $flags | grep -E "steady|error|Error" | tail -3
    status=${PIPESTATUS[0]}  # 137 (or 124): killed at the limit, with its workers (one process group)
    (( status == 124 || status == 137 )) && printf '\nError: timed out after %s s\n' "$limit" | tee -a "$OUT/$i-seq$SEQ.log"
    i=$((i + 1))
done
"${PYTHON:-$(command -v python3 || command -v python)}" - "$OUT" "$SEQ" <<'PY'
import json, sys
from pathlib import Path
out, seq = Path(sys.argv[1]), sys.argv[2]
rows, base = [], None
for index, name_file in enumerate(sorted(out.glob("*.name"), key=lambda p: int(p.stem))):
    name, metrics = name_file.read_text().strip(), out / name_file.stem / f"seq{seq}" / "metrics.json"
    if not metrics.is_file():
        log = out / f"{name_file.stem}-seq{seq}.log"
        last = [l for l in log.read_text(errors="replace").splitlines() if "Error" in l or l.startswith(("error:", "skipped:"))][-1:] if log.is_file() else []
        rows.append(f"| {name} | failed: {(last or ['no log'])[0][:120]} | | | |")
        continue
    train = json.loads(metrics.read_text())["train"]
    figures = train.get("steady_state") or {**train, "from_step": 0}  # STEPS within the first log window
    tps = figures["tokens_per_second"]
    base = tps if index == 0 else base
    mfu = f"{figures['mfu']:.1%}" if "mfu" in figures else "n/a"
    ratio = f"{tps / base:.2f}x" if base else "n/a (the first variant failed)"
    rows.append(f"| {name} | {tps:,.0f} (from step {figures['from_step']}) | {mfu} | "
                f"{figures['peak_memory_gib']:.1f} GiB | {ratio} |")
print(f"| variant (seq {seq}) | steady tokens/s | MFU | peak memory | vs first |\n|---|---|---|---|---|")
print("\n".join(rows))
sys.exit(0 if any("failed:" not in row for row in rows) else 1)  # no variant measured: the command failed
PY
