#!/usr/bin/env bash
# Side by side on the GPU machine: each variant in its own process over all shapes (the model
# loads once per variant), one shared run id.
#   QLORA_COMMIT=$(git rev-parse --short HEAD) RUN_ID=h100-YYYYMMDD-x bash benchmarks/train_throughput.sh "2x1024 1x2048 4x4096" "qlora_platform unsloth"
# Lines go to $OUT/train_throughput.jsonl; append them to benchmarks/results/train_throughput.jsonl.
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHAPES=${1:-"2x1024 1x2048 4x4096"}; VARIANTS=${2:-"reference qlora_platform unsloth"}
RUN_ID=${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}
for v in $VARIANTS; do
  timeout "${VARIANT_TIMEOUT:-280}" python benchmarks/train_throughput.py --shape mistral-7b --shapes "${SHAPES// /,}" \
    --variant "$v" --run-id "$RUN_ID" --commit "${QLORA_COMMIT:-unknown}" 2> "$OUT/err-$v.log" \
    | grep '^{' | tee -a "$OUT/train_throughput.jsonl" \
    || echo "{\"variant\": \"$v\", \"error\": \"see err-$v.log\"}"
done
