#!/usr/bin/env bash
# GPU check: train the nanovlm-222m shape (random init, bf16, random 224 px data) for ~30 steps,
# report samples/s, MFU and peak memory, then check generation; then decode speed at batch 1.
# Needs CUDA; no network.
# Usage: bash benchmarks/gpu_check.sh [--steps 30] [--batch-size 32] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python3}"
"$PYTHON" benchmarks/gpu_check.py "$@"
echo
echo "decode speed, batch 1, nanovlm-222m shape on CUDA:"
"$PYTHON" benchmarks/decode.py --device cuda --preset nanovlm-222m --new-tokens 64
