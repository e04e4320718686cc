#!/usr/bin/env bash
# DPO: `qlora train` (configs/mistral-7b-dpo.yaml) against TRL's DPOTrainer with its default PEFT
# reference (the adapter disabled, every step) on the same pairs, batch 2 pairs x grad-accum 4,
# max length 1024: the sample preference pairs (`qlora prepare --sample-preferences`, real
# lengths) and pairs of 1024-token rows (the memory bound). The model is the random-weight
# Mistral-7B-shaped checkpoint with the bundled SmolLM2 tokenizer, as in real_data_train.sh.
# One JSON line per run to $RESULTS (benchmarks/dpo_train.py lists the fields).
#   RUN_ID=... COMMIT=... bash benchmarks/dpo_train.sh
#   RUNS="qlora:pref trl-dpo:pref" STEPS_PREF=15 bash benchmarks/dpo_train.sh
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RESULTS=${RESULTS:-$OUT/dpo_train.jsonl}
RUNS=${RUNS:-"qlora:pref trl-dpo:pref qlora:long trl-dpo:long"}
export RUN_ID=${RUN_ID:-dpo-$(date -u +%Y%m%dT%H%M%S)} COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
MODEL=/tmp/m7b-smollm2-tok
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f $MODEL/config.json ] || python benchmarks/random_checkpoint.py mistral-7b $MODEL \
  --tokenizer benchmarks/assets/smollm2-tokenizer --vocab-size 49152
[ -f /tmp/pref/train.jsonl ] || python -m qlora_platform.cli prepare --sample-preferences --out-dir /tmp/pref
[ -f /tmp/long/train.jsonl ] || python benchmarks/dpo_train.py long-pairs $MODEL /tmp/long
for run in $RUNS; do
  variant=${run%%:*}; data=${run##*:}
  steps=$([ "$data" = long ] && echo "${STEPS_LONG:-6}" || echo "${STEPS_PREF:-15}")
  echo "== $variant $data ($steps steps)"
  timeout "${RUN_TIMEOUT:-280}" python benchmarks/dpo_train.py "$variant" $MODEL /tmp/$data /tmp/work-dpo-$variant-$data \
    --steps "$steps" --results "$RESULTS" 2>&1 | tee "$OUT/log-dpo-$variant-$data.txt" \
    | grep -v -e 'it/s]' -e 's/it]' | tail -15
done
cat "$RESULTS"
