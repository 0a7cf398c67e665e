#!/usr/bin/env bash
# Compiles (does not link or run) tunenet's `cuda` feature with NVIDIA's nvcc from PyPI, so
# the GPU path cannot rot on machines without a GPU. The venv lives in a cache dir outside
# the clone so the wheels and candle's PTX kernels are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TUNENET_CACHE:-$HOME/.cache/tunenet}"
venv="$cache/cuda-venv"
if [ ! -x "$venv/bin/nvcc-ok" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-crt
  touch "$venv/bin/nvcc-ok" && chmod +x "$venv/bin/nvcc-ok"
fi
nvcc=$(find "$venv/lib" -path '*/nvidia/*/bin/nvcc' -type f | head -n 1)
if [ -z "$nvcc" ]; then
  echo "cuda-check: nvcc not found in $venv" >&2
  exit 1
fi
export CUDA_HOME
CUDA_HOME=$(dirname "$(dirname "$nvcc")")
export CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
# cudarc does not know every nvcc release by name; CUDA 13.0's API is a subset of later ones.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
# A100 by default (70 for V100, 90 for H100); there is no GPU here to ask.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
# The binary and the GPU tests (tests/gpu.rs), which scripts/gpu-check.sh runs on a GPU.
# NCCL is loaded at run time (cudarc's dynamic loading): compiling it needs no NCCL here.
features="${CUDA_CHECK_FEATURES:-cuda,nccl}"
cargo check --features "$features" --bin tunenet --test gpu
echo "cuda-check: features $features compile (compute capability $CUDA_COMPUTE_CAP)"
