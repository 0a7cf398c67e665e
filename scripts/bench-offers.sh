#!/usr/bin/env bash
# Load limits measured from outside, against real daemon processes (release build):
#  - `tunenet bench offers`: offer -> decision round trips a second against a miner daemon,
#    1 to 256 requests in flight (one connection each, then all on one connection, as one
#    validator sends them), with latency percentiles and the miner's CPU and RSS, beside a
#    raw TCP ping-pong of the same bytes at the same concurrency (the floor);
#  - `tunenet bench fanout`: a validator daemon offering jobs to 100 and 1,000 miners
#    served by this process, each on its own port: time to reach every miner, the
#    validator's CPU per job and its RSS.
#   scripts/bench-offers.sh [SECONDS_PER_LEVEL]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/tunenet"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin" bench offers --seconds "$secs" --concurrency 1,8,64,256 --reference
"$bin" bench offers --seconds "$secs" --concurrency 8,64,256 --connections 1
"$bin" bench fanout --miners 100,1000 --jobs 6
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
