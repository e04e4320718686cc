#!/usr/bin/env bash
# Side by side on the GPU machine: every variant on each shape, one process each, one shared run id.
#   QLORA_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/train_throughput.sh "2x1024 1x2048 4x4096" "reference qlora_platform unsloth"
# Lines go to $OUT/train_throughput.jsonl; append them to benchmarks/results/train_throughput.jsonl.
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHAPES=${1:-"2x1024 1x2048 4x4096"}; VARIANTS=${2:-"reference qlora_platform unsloth"}
RUN_ID=${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}
for shape in $SHAPES; do
  b=${shape%x*}; s=${shape#*x}
  for v in $VARIANTS; do
    timeout 400 python benchmarks/train_throughput.py --shape mistral-7b --batch "$b" --seq "$s" --variant "$v" \
      --run-id "$RUN_ID" --commit "${QLORA_COMMIT:-unknown}" 2> "$OUT/err-$v-$shape.log" | tail -1 | tee -a "$OUT/train_throughput.jsonl" \
      || echo "{\"variant\": \"$v\", \"batch\": $b, \"seq\": $s, \"error\": \"see err-$v-$shape.log\"}"
  done
done
