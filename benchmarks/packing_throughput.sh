#!/usr/bin/env bash
# `qlora train` on the sample data set, padded against packed (sdpa's dense block mask, and
# flex_attention's variable-length attention), Mistral-7B preset on random weights, 20 steps
# each. One JSON line per layout to $OUT/packing_throughput.jsonl: non-padding tokens/s over the
# training time, peak memory, steps. GPU machine, repo root, .device-site carried.
#   QLORA_COMMIT=$(git rev-parse --short HEAD) RUN_ID=... bash benchmarks/packing_throughput.sh
source benchmarks/train_runs.sh
for layout in "padded:--packing false" "packed-sdpa:--packing true" "packed-flex:--packing true --attn_implementation flex_attention"; do
  name=${layout%%:*}; flags=${layout#*:}
  train_and_report packing_throughput.jsonl layout "$name" 400 "tokens_per_s peak_memory_gib steps train_seconds device" \
    --max_steps 20 --logging_steps 5 $flags
done
