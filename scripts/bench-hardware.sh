#!/usr/bin/env bash
# The verified benchmark's two sides on this machine: the miner's compute of an n = 4096
# f32 challenge and the validator's verification, timed apart (docs/BENCHMARKS.md).
# Usage: scripts/bench-hardware.sh [device] [runs]   e.g. scripts/bench-hardware.sh cuda:0 5
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cpu}"; runs="${2:-3}"
features=""; [[ "$device" == cuda* ]] && features="--features cuda"
cargo build --release $features
for _ in $(seq "$runs"); do
  "${CARGO_TARGET_DIR:-target}/release/tunenet" hardware --benchmark 4096 --device "$device" | tail -1
done
