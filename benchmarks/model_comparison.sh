#!/usr/bin/env bash
# Mistral-7B against Phi-3-mini, and max_seq_len 1024 against 2048 (notebooks/model_comparison.md,
# notebooks/hparam_tuning.md experiment C): `qlora train` with each preset on the sample data
# set, packed rows, a fixed number of optimizer steps, each model a random-weight checkpoint in
# its real shape with the bundled SmolLM2 tokenizer (49,152 tokens, so the data keeps its real
# lengths). One JSON line per run (benchmarks/real_data_train.py lists the fields).
#
# Run on the GPU machine from the repo root, with .device-site carried (bitsandbytes, pydantic,
# jsonschema; benchmarks/README.md):
#   RUN_ID=... COMMIT=... STEPS=30 bash benchmarks/model_comparison.sh
#   LAYOUT=padded RUNS="mistral-7b:1024 phi3-mini:1024" bash benchmarks/model_comparison.sh
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RESULTS=${RESULTS:-$OUT/model_comparison.jsonl}
STEPS=${STEPS:-30}
LAYOUT=${LAYOUT:-packed}  # packed rows (the default here) or padded (the presets as shipped)
RUNS=${RUNS:-"mistral-7b:1024 mistral-7b:2048 phi3-mini:1024 phi3-mini:2048"}
export RUN_ID=${RUN_ID:-cmp-$(date -u +%Y%m%dT%H%M%S)} COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f /tmp/data/train.jsonl ] || python -m qlora_platform.cli prepare --sample --out-dir /tmp/data
for run in $RUNS; do
  shape=${run%%:*}; seq=${run##*:}; model=/tmp/$shape-smollm2-tok
  [ -f "$model/config.json" ] || python benchmarks/random_checkpoint.py "$shape" "$model" \
    --tokenizer benchmarks/assets/smollm2-tokenizer --vocab-size 49152
  echo "== $shape max_seq_len $seq"
  python benchmarks/real_data_train.py qlora "$LAYOUT" "$model" /tmp/data "/tmp/work-$shape-$seq" \
    --preset "configs/$shape.yaml" --max-seq-len "$seq" --max-steps "$STEPS" --results "$RESULTS" 2>&1 \
    | tee "$OUT/log-$shape-$seq.txt" | grep -v -e 'it/s]' -e 's/it]' -e 'step/s' | tail -25
done
cat "$RESULTS"
