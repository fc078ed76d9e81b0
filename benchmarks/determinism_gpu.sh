#!/usr/bin/env bash
# Cross-device determinism on a GPU machine (onnxruntime-gpu + a CUDA device): one script.
#   1. encode on CUDA, decode on CPU (1 and 2 threads) and on CUDA;
#   2. encode on CPU, decode on CUDA and on CPU.
# Latents must be identical for every decoder (exit status 1 otherwise); pixel
# bit-identity across devices is reported, not required (the synthesis is float).
# Results: $OUT (default docs/) determinism_cuda_encode.json, determinism_cpu_encode.json.
#   bash benchmarks/determinism_gpu.sh [CHUNKS]
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS="${1:-2048}"
OUT="${OUT:-docs}"
python -c "import onnxruntime as o, sys; p=o.get_available_providers(); print(p); \
sys.exit(0 if 'CUDAExecutionProvider' in p else 'no CUDAExecutionProvider: install onnxruntime-gpu')"
status=0
python benchmarks/determinism.py --chunks "$CHUNKS" --encode cuda:0 \
    --decode cpu:1,cpu:2,cuda:0 --json "$OUT/determinism_cuda_encode.json" || status=1
python benchmarks/determinism.py --chunks "$CHUNKS" --encode cpu:0 \
    --decode cuda:0,cpu:2 --json "$OUT/determinism_cpu_encode.json" || status=1
exit $status
