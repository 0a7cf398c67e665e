#!/usr/bin/env bash
# Blob throughput on loopback: libp2p blob fetch (TCP+noise+yamux, QUIC) and the
# validator's gRPC download, against a raw TCP copy and hashing of the same file (default
# 1 GiB), as MB/s, ratios to raw TCP and to b3sum, and CPU seconds per GiB. Release build.
# b3sum (a cargo crate) is installed once into the cache dir outside the clone when it is
# missing.
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
TUNENET_BENCH_FILE="$file" TUNENET_B3SUM="$b3sum" \
  cargo bench -p tunenet-p2p --bench blob_throughput --quiet
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
