#!/usr/bin/env bash
# `qlora train` on two GPUs of one host (DDP and FSDP through --num-processes 2) against one GPU
# with the same global batch (grad_accum 2): Mistral-7B preset on random weights, the sample
# data set packed, STEPS steps each. One JSON line per run to $OUT/multi_gpu.jsonl (rank 0's
# peak memory, tokens/s of all ranks together, first/last loss). nvidia-h100-x2, .device-site carried.
#   QLORA_COMMIT=$(git rev-parse --short HEAD) RUN_ID=... bash benchmarks/multi_gpu.sh
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="python -m qlora_platform.cli"
[ -f /tmp/m7b/config.json ] || python benchmarks/random_checkpoint.py mistral-7b /tmp/m7b --tokenizer benchmarks/assets/tok32k
[ -f /tmp/data/train.jsonl ] || $Q prepare --sample --out-dir /tmp/data
common="--config configs/mistral-7b.yaml --model.name /tmp/m7b --train_file /tmp/data/train.jsonl --eval_file null
        --max_steps ${STEPS:-10} --logging_steps 1 --report_to [] --packing true --batch_size 2 --save_steps 1000"
for run in ${RUNS:-"one-gpu:--grad_accum 2" "ddp:--num-processes 2 --strategy ddp" "fsdp:--num-processes 2 --strategy fsdp"}; do
  name=${run%%:*}; flags=${run#*:}
  rm -rf "/tmp/run-$name"
  timeout "${RUN_TIMEOUT:-150}" $Q train $common $flags --output.dir "/tmp/run-$name" > "$OUT/train-$name.log" 2>&1
  python - "$name" "/tmp/run-$name/train_summary.json" <<'PY' | tee -a "$OUT/multi_gpu.jsonl"
import json, os, sys
name, path = sys.argv[1], sys.argv[2]
try:
    s = json.load(open(path))
    line = {"run": name, **{k: s[k] for k in ("tokens_per_s", "peak_memory_gib", "steps", "train_seconds",
                                              "train_loss_first", "train_loss_last", "device")}}
except (OSError, KeyError, ValueError) as err:
    line = {"run": name, "error": f"{type(err).__name__}: see train-{name}.log"}
line |= {"commit": os.environ.get("QLORA_COMMIT", "unknown"), "run_id": os.environ.get("RUN_ID", "")}
print(json.dumps(line))
PY
done
