#!/usr/bin/env bash
# The GPU benchmarks and tests in sections that each fit one device call (600 s), results to $OUT.
#   QLORA_COMMIT=$(git rev-parse --short HEAD) RUN_ID=h100-YYYYMMDD-x bash benchmarks/gpu_session.sh SECTION
# SECTION: tests | loss-ab | train | train-small | train-large | real-data | generate | serve | multi-gpu
# (multi-gpu on a two-GPU machine: DDP, FSDP and one GPU with the same global batch; real-data takes RUNS)
# (generate and serve take WEIGHTS="nf4 bf16" and generate VARIANTS="reference qlora_platform unsloth")
# Carry .device-site (benchmarks/README.md says how to build it).
set -uo pipefail
export PYTHONPATH=$PWD/.device-site:$PWD/src:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RUN_ID=${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}; export RUN_ID QLORA_COMMIT=${QLORA_COMMIT:-unknown}
nvidia-smi -L
gen() {  # variant weights [batch]
  timeout 240 python benchmarks/generate_throughput.py --shape mistral-7b --variant "$1" --weights "$2" \
    --batch "${3:-1}" --run-id "$RUN_ID" --commit "$QLORA_COMMIT" 2> "$OUT/err-gen-$1-$2.log" | tail -1 \
    | tee -a "$OUT/generate_throughput.jsonl"
}
case "${1:-}" in
  tests)   # every GPU test (loss parity included), and the kernel/infer/train suites on CUDA tensors
    QLORA_TEST_OUT=$OUT timeout 560 python -m pytest -q -p no:cacheprovider -rf tests/kernels tests/infer/test_static_decode.py \
      tests/infer/test_batcher.py tests/train/test_gpu.py tests/train/test_flat_params.py tests/train/test_cuda_graph.py \
      2>&1 | grep -E "passed|failed|^FAILED|^E  " | head -30 ;;
  loss-ab)   # b2 x s1024, the 11-step loss with and without CUDA graphs, side by side
    python -c "from benchmarks.common import checkpoint; checkpoint('mistral-7b')"
    for g in true false; do
      timeout 200 python benchmarks/train_throughput.py --shape mistral-7b --batch 2 --seq 1024 --variant qlora_platform \
        --set training.cuda_graphs=$g --run-id "$RUN_ID" --commit "$QLORA_COMMIT" 2> "$OUT/err-ab-$g.log" | tail -1 \
        | tee -a "$OUT/train_throughput.jsonl" &
    done; wait ;;
  train)   # the three shapes, the platform and Unsloth, one process each over all shapes
    bash benchmarks/train_throughput.sh "2x1024 1x2048 4x4096" "qlora_platform unsloth" ;;
  train-small)   # both small shapes, the two stacks alternating twice (the host moves these figures)
    for rep in 1 2; do
      timeout 560 bash benchmarks/train_throughput.sh "2x1024 1x2048" "unsloth qlora_platform"
    done ;;
  train-large)   # b4 x s4096: Unsloth, the default, forward-only fp8
    bash benchmarks/train_throughput.sh "4x4096" "unsloth qlora_platform"
    timeout 200 python benchmarks/train_throughput.py --shape mistral-7b --batch 4 --seq 4096 --variant qlora_platform \
      --set training.fp8=true --run-id "$RUN_ID" --commit "$QLORA_COMMIT" 2> "$OUT/err-fp8.log" | tail -1 \
      | tee -a "$OUT/train_throughput.jsonl" ;;
  real-data)   # qlora train against Unsloth's SFTTrainer, 1 epoch each: pick RUNS that fit the call
    COMMIT=$QLORA_COMMIT timeout 580 bash benchmarks/real_data_train.sh ;;
  generate)
    for w in ${WEIGHTS:-nf4 bf16}; do for v in ${VARIANTS:-reference qlora_platform unsloth}; do gen "$v" "$w"; done; done ;;
  serve)
    for w in ${WEIGHTS:-nf4 bf16}; do
      timeout 280 python benchmarks/serve_throughput.py --shape mistral-7b --weights "$w" --streams 16 \
        --run-id "$RUN_ID" --commit "$QLORA_COMMIT" 2> "$OUT/err-serve-$w.log" | tail -1 | tee -a "$OUT/serve_throughput.jsonl"
    done ;;
  multi-gpu)   # the first steps compile kernels and FSDP steps are slow: give each run its time
    STEPS=${STEPS:-8} RUN_TIMEOUT=${RUN_TIMEOUT:-170} bash benchmarks/multi_gpu.sh ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac
