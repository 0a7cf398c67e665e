#!/usr/bin/env bash
# Measures what the integrity checks add to evaluating a submission: runs the red team over the wire
# (validator and miner daemons, gRPC-only adversaries, the tiny model) and prints the cost line.
# Usage: scripts/bench-integrity.sh [competitions]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-5}"
cargo build --release --quiet
out=$(mktemp -d)/INTEGRITY.md
"${CARGO_TARGET_DIR:-target}/release/tunenet" redteam --competitions "$n" --out "$out" >/dev/null
grep -A2 '^## Cost' "$out" | tail -n 1
