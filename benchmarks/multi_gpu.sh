#!/usr/bin/env bash
# `qlora train` on two GPUs of one host (DDP and FSDP through --num-processes 2) against one GPU
# with the same global batch (grad_accum 2): Mistral-7B preset on random weights, the sample
# data set packed, STEPS steps each. One JSON line per run to $OUT/multi_gpu.jsonl (rank 0's
# peak memory, tokens/s of all ranks together, first/last loss). nvidia-h100-x2, .device-site carried.
#   QLORA_COMMIT=$(git rev-parse --short HEAD) RUN_ID=... bash benchmarks/multi_gpu.sh
source benchmarks/train_runs.sh
for run in ${RUNS:-"one-gpu:--grad_accum 2" "ddp:--num-processes 2 --strategy ddp" "fsdp:--num-processes 2 --strategy fsdp"}; do
  name=${run%%:*}; flags=${run#*:}
  train_and_report multi_gpu.jsonl run "$name" "${RUN_TIMEOUT:-150}" \
    "tokens_per_s peak_memory_gib steps train_seconds train_loss_first train_loss_last device" \
    --max_steps "${STEPS:-10}" --logging_steps 1 --packing true --batch_size 2 --save_steps 1000 $flags
done
