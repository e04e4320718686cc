#!/usr/bin/env bash
# `qlora train` on the sample data set, padded against packed (sdpa's dense block mask, and
# flex_attention's variable-length attention), Mistral-7B preset on random weights, 20 steps
# each. One JSON line per layout to $OUT/packing_throughput.jsonl: non-padding tokens/s over the
# training time, peak memory, steps. GPU machine, repo root, .device-site carried.
#   QLORA_COMMIT=$(git rev-parse --short HEAD) RUN_ID=... bash benchmarks/packing_throughput.sh
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="python -m qlora_platform.cli"
[ -f /tmp/m7b/config.json ] || python benchmarks/random_checkpoint.py mistral-7b /tmp/m7b --tokenizer benchmarks/assets/tok32k
[ -f /tmp/data/train.jsonl ] || $Q prepare --sample --out-dir /tmp/data
common="--config configs/mistral-7b.yaml --model.name /tmp/m7b --train_file /tmp/data/train.jsonl --eval_file null
        --max_steps 20 --logging_steps 5 --report_to []"
for layout in "padded:--packing false" "packed-sdpa:--packing true" "packed-flex:--packing true --attn_implementation flex_attention"; do
  name=${layout%%:*}; flags=${layout#*:}
  rm -rf "/tmp/run-$name"
  timeout 400 $Q train $common $flags --output.dir "/tmp/run-$name" > "$OUT/train-$name.log" 2>&1
  python - "$name" "/tmp/run-$name/train_summary.json" <<'PY' | tee -a "$OUT/packing_throughput.jsonl"
import json, os, sys
name, path = sys.argv[1], sys.argv[2]
try:
    s = json.load(open(path))
    line = {"layout": name, "tokens_per_s": s["tokens_per_s"], "peak_memory_gib": s["peak_memory_gib"],
            "steps": s["steps"], "train_seconds": s["train_seconds"], "device": s["device"]}
except (OSError, KeyError, ValueError) as err:
    line = {"layout": name, "error": f"{type(err).__name__}: see train-{name}.log"}
line |= {"commit": os.environ.get("QLORA_COMMIT", "unknown"), "run_id": os.environ.get("RUN_ID", "")}
print(json.dumps(line))
PY
done
