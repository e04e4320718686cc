#!/usr/bin/env bash
# `qlora train` with the Mistral-7B preset on a random-weight checkpoint of that shape, 20 steps.
# Run on the GPU machine from the repo root, with .device-site carried (see benchmarks/README.md).
set -euo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="python -m qlora_platform.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$Q doctor || true
[ -f /tmp/m7b/config.json ] || python benchmarks/random_checkpoint.py mistral-7b /tmp/m7b --tokenizer benchmarks/assets/tok32k
$Q prepare --sample --out-dir /tmp/data
common="--config configs/mistral-7b.yaml --model.name /tmp/m7b --train_file /tmp/data/train.jsonl --eval_file /tmp/data/eval.jsonl"
$Q train $common --dry-run --packing true | tail -11
# packing fills every row to 1024 tokens: the b2 x s1024 shape of the anchors (grad_accum 4 as in the preset)
$Q train $common --max_steps 20 --packing true --logging_steps 5 --output.dir /tmp/run7b --overwrite 2>&1 | grep -v 'it/s]'
cp /tmp/run7b/train_summary.json "$OUT/train_summary_7b.json"; cp /tmp/run7b/train_log.jsonl "$OUT/train_log_7b.jsonl"
python -m pytest -q -m gpu tests/train/test_gpu.py 2>&1 | tail -3
