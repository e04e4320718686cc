#!/usr/bin/env bash
# Real data: `qlora train` (Mistral-7B preset, 1 epoch) against Unsloth's SFTTrainer on the same
# data, batch (2 x grad-accum 4), max length 1024, lr 2e-4 cosine with 3% warm-up, paged AdamW
# 8-bit: packed (Unsloth: packing + padding-free) and padded. The model is a random-weight
# Mistral-7B-shaped checkpoint with the bundled SmolLM2 tokenizer (49,152 tokens; a real BPE
# tokenizer gives the sample data its real length); the data is `qlora prepare --sample`.
# One JSON line per run to $RESULTS (benchmarks/real_data_train.py lists the fields).
#
# Run on the GPU machine from the repo root, with .device-site carried (bitsandbytes, pydantic
# and the Unsloth list of benchmarks/README.md):
#   RUN_ID=... COMMIT=... bash benchmarks/real_data_train.sh            # all four runs
#   RUNS="qlora:packed unsloth-sft:packed" bash benchmarks/real_data_train.sh
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RESULTS=${RESULTS:-$OUT/real_data_train.jsonl}
RUNS=${RUNS:-"qlora:packed unsloth-sft:packed qlora:padded unsloth-sft:padded"}
export RUN_ID=${RUN_ID:-real-$(date -u +%Y%m%dT%H%M%S)} COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
MODEL=/tmp/m7b-smollm2-tok
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f $MODEL/config.json ] || python benchmarks/random_checkpoint.py mistral-7b $MODEL \
  --tokenizer benchmarks/assets/smollm2-tokenizer --vocab-size 49152
[ -f /tmp/data/train.jsonl ] || python -m qlora_platform.cli prepare --sample --out-dir /tmp/data
for run in $RUNS; do
  variant=${run%%:*}; layout=${run##*:}
  echo "== $variant $layout"
  python benchmarks/real_data_train.py "$variant" "$layout" $MODEL /tmp/data /tmp/work-$variant-$layout \
    --results "$RESULTS" 2>&1 | tee "$OUT/log-$variant-$layout.txt" | grep -v -e 'it/s]' -e 's/it]' | tail -40
done
cat "$RESULTS"
