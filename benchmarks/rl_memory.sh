#!/usr/bin/env bash
# Reward model, then PPO and GRPO with it, on one 4-bit base: a few steps each of the real CLI
# with the Mistral-7B presets (configs/mistral-7b-dpo.yaml with method reward, then
# configs/mistral-7b-ppo.yaml), the random Mistral-7B-shaped checkpoint with the bundled model's
# tokenizer, and the sample preference pairs. One JSON line per run (method, steps, GPU peak,
# train seconds, the run's last logged metrics) to $RESULTS.
#   RUN_ID=... COMMIT=... STEPS=3 bash benchmarks/rl_memory.sh
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RESULTS=${RESULTS:-$OUT/rl_memory.jsonl}
export RUN_ID=${RUN_ID:-rl-$(date -u +%Y%m%dT%H%M%S)} COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
MODEL=/tmp/m7b-smollm2-tok; STEPS=${STEPS:-4}; MAX_NEW=${MAX_NEW:-64}  # a small rollout: 4 answers of 64 tokens
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f $MODEL/config.json ] || python benchmarks/random_checkpoint.py mistral-7b $MODEL \
  --tokenizer benchmarks/assets/smollm2-tokenizer --vocab-size 49152
[ -f /tmp/pref/train.jsonl ] || python -m qlora_platform.cli prepare --sample-preferences --out-dir /tmp/pref
common=(--model.name $MODEL --train_file /tmp/pref/train.jsonl --eval_file null --max_steps "$STEPS" --logging_steps 1 --overwrite)
run() {  # name, then qlora train arguments
  local name=$1; shift
  echo "== $name"
  timeout "${RUN_TIMEOUT:-200}" python -m qlora_platform.cli train "$@" "${common[@]}" --output.dir /tmp/rl-$name \
    2>&1 | grep -v -e 'it/s]' -e 's/it]' | tail -6
  python - "$name" /tmp/rl-$name <<'PY' | tee -a "$RESULTS"
import json, os, sys
name, run = sys.argv[1], sys.argv[2]
try:
    summary = json.load(open(f"{run}/train_summary.json"))
    steps = [json.loads(l) for l in open(f"{run}/train_log.jsonl") if '"loss"' in l]
    line = {"run": name, "steps": len(steps), "gpu_peak_gib": summary.get("peak_memory_gib"),
            "train_seconds": summary.get("train_seconds"), "last": steps[-1] if steps else None}
except OSError as err:
    line = {"run": name, "error": str(err)}
import torch
line |= {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
         "commit": os.environ["COMMIT"], "run_id": os.environ["RUN_ID"]}
print(json.dumps(line))
PY
}
run reward --config configs/mistral-7b-dpo.yaml --training.method reward
rl=(--alignment.reward_adapter /tmp/rl-reward/final_adapter --alignment.max_new_tokens "$MAX_NEW")
run ppo --config configs/mistral-7b-ppo.yaml "${rl[@]}"
run grpo --config configs/mistral-7b-ppo.yaml --training.method grpo "${rl[@]}"
