#!/usr/bin/env bash
# The GPU check of issue 8, on one H100/H200 whose image has PyTorch (CUDA) and transformers and nothing
# else of ours: it installs nothing. The repository root is the `stagemesh` package, so a symlink named
# `stagemesh` on PYTHONPATH makes it importable as it is; only the model code (torch, safetensors) is used,
# no gRPC. Writes a random-weight Llama-3-8B-shaped bf16 checkpoint (~16 GB) to a temporary folder,
# measures, deletes it. Meant to take 3-4 minutes; the timeout only guards against a hang. Results: $OUT (default bench-results/gpu).
#
#   bash benchmarks/gpu_check.sh [--shape tiny --device cpu] [--tokens N] [--prompt N] [--reps N]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
ln -s "$root" "$shim/stagemesh"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
timeout 600 "${PYTHON:-python3}" -m stagemesh.benchmarks.gpu_check --out "${OUT:-bench-results/gpu}" "$@"
