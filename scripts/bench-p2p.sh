#!/usr/bin/env bash
# Blob throughput over libp2p on loopback against a raw TCP copy and blake3 hashing of the
# same file (default 1 GiB), as MB/s and ratios to raw TCP. Release build. b3sum (a cargo
# crate) is installed once into the cache dir outside the clone when it is missing.
#   scripts/bench-p2p.sh [MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
mib="${1:-1024}"
cache="${TUNENET_CACHE:-$HOME/.cache/tunenet}"
b3sum="$cache/b3sum/bin/b3sum"
if [ ! -x "$b3sum" ] && ! command -v b3sum >/dev/null; then
  cargo install b3sum --locked --quiet --root "$cache/b3sum" || echo "bench-p2p: b3sum not installed; skipping it" >&2
fi
[ -x "$b3sum" ] || b3sum="$(command -v b3sum || true)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
file="$work/blob.bin"
head -c "$((mib << 20))" /dev/urandom > "$file"

cargo bench -p tunenet-p2p --bench blob_throughput --no-run --quiet
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg), cores: $(nproc)"
TUNENET_BENCH_FILE="$file" cargo bench -p tunenet-p2p --bench blob_throughput --quiet

if [ -n "$b3sum" ]; then
  cat "$file" > /dev/null
  for threads in 1 "$(nproc)"; do
    start=$(date +%s.%N)
    "$b3sum" --num-threads "$threads" "$file" > /dev/null
    end=$(date +%s.%N)
    awk -v s="$start" -v e="$end" -v b="$((mib << 20))" -v t="$threads" \
      'BEGIN { printf "%-34s %10.0f\n", "b3sum --num-threads " t, b / 1e6 / (e - s) }'
  done
fi
