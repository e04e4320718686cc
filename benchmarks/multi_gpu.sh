#!/usr/bin/env bash
# `qlora train` on two GPUs of one host (DDP and FSDP through --num-processes 2) against one GPU
# with the same global batch (grad_accum 2): Mistral-7B preset on random weights, the sample
# data set packed, STEPS steps each. One JSON line per run to $OUT/multi_gpu.jsonl (rank 0's
# peak memory, tokens/s of all ranks together, first/last loss), or an error line pointing at
# the run's log ($OUT/train-NAME.log). A two-GPU machine, repo root, .device-site carried.
#   QLORA_COMMIT=$(git rev-parse --short HEAD) RUN_ID=... bash benchmarks/multi_gpu.sh
#   RUNS="ddp fsdp" STEPS=8 RUN_TIMEOUT=170 bash benchmarks/multi_gpu.sh     # runs: one-gpu ddp fsdp
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="python -m qlora_platform.cli"
[ -f /tmp/m7b/config.json ] \
  || python benchmarks/random_checkpoint.py mistral-7b /tmp/m7b --tokenizer benchmarks/assets/tok32k
[ -f /tmp/data/train.jsonl ] || $Q prepare --sample --out-dir /tmp/data
COMMON="--config configs/mistral-7b.yaml --model.name /tmp/m7b --train_file /tmp/data/train.jsonl --eval_file null
        --report_to [] --logging_steps 1 --packing true --batch_size 2 --save_steps 1000"
KEYS="tokens_per_s peak_memory_gib steps train_seconds train_loss_first train_loss_last device"

# One `qlora train` in /tmp/run-NAME; its summary's KEYS as a JSON line {run: NAME, ..., commit, run_id}.
train_and_report() {  # NAME QLORA-TRAIN-ARGS...
  local name=$1; shift
  rm -rf "/tmp/run-$name"
  timeout "${RUN_TIMEOUT:-150}" $Q train $COMMON "$@" --output.dir "/tmp/run-$name" > "$OUT/train-$name.log" 2>&1
  python - "$name" "/tmp/run-$name/train_summary.json" $KEYS <<'PY' | tee -a "$OUT/multi_gpu.jsonl"
import json, os, sys
name, path, *keys = sys.argv[1:]
try:
    summary = json.load(open(path))
    line = {"run": name, **{k: summary[k] for k in keys}}
except (OSError, KeyError, ValueError) as err:
    line = {"run": name, "error": f"{type(err).__name__}: see train-{name}.log"}
line |= {"commit": os.environ.get("QLORA_COMMIT", "unknown"), "run_id": os.environ.get("RUN_ID", "")}
print(json.dumps(line))
PY
}

for name in ${RUNS:-one-gpu ddp fsdp}; do
  case $name in
    one-gpu) flags="--grad_accum 2" ;;
    ddp|fsdp) flags="--num-processes 2 --strategy $name" ;;
    *) echo "unknown run '$name' (one-gpu, ddp, fsdp)" >&2; exit 2 ;;
  esac
  train_and_report "$name" --max_steps "${STEPS:-10}" $flags
done
