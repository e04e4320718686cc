# Sourced by the benchmarks that run `qlora train` itself (packing_throughput.sh, multi_gpu.sh):
# the environment, the random Mistral-7B checkpoint and the sample data set, built once in
# /tmp, and `train_and_report`, which runs one training and reports its summary as a JSON line.
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="python -m qlora_platform.cli"
[ -f /tmp/m7b/config.json ] || python benchmarks/random_checkpoint.py mistral-7b /tmp/m7b --tokenizer benchmarks/assets/tok32k
[ -f /tmp/data/train.jsonl ] || $Q prepare --sample --out-dir /tmp/data
TRAIN_COMMON="--config configs/mistral-7b.yaml --model.name /tmp/m7b --train_file /tmp/data/train.jsonl --eval_file null
              --report_to []"

# train_and_report JSONL LABEL NAME TIMEOUT "SUMMARY KEYS" QLORA-TRAIN-ARGS...
# One `qlora train` in /tmp/run-NAME (log: $OUT/train-NAME.log); appends {LABEL: NAME, the summary's
# KEYS, commit, run_id} to $OUT/JSONL, or an error line pointing at the log.
train_and_report() {
  local jsonl=$1 label=$2 name=$3 limit=$4 keys=$5; shift 5
  rm -rf "/tmp/run-$name"
  timeout "$limit" $Q train $TRAIN_COMMON "$@" --output.dir "/tmp/run-$name" > "$OUT/train-$name.log" 2>&1
  python - "$label" "$name" "/tmp/run-$name/train_summary.json" $keys <<'PY' | tee -a "$OUT/$jsonl"
import json, os, sys
label, name, path, *keys = sys.argv[1:]
try:
    summary = json.load(open(path))
    line = {label: name, **{k: summary[k] for k in keys}}
except (OSError, KeyError, ValueError) as err:
    line = {label: name, "error": f"{type(err).__name__}: see train-{name}.log"}
line |= {"commit": os.environ.get("QLORA_COMMIT", "unknown"), "run_id": os.environ.get("RUN_ID", "")}
print(json.dumps(line))
PY
}
