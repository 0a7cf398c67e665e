#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60), one after another,
# with AddressSanitizer, a 2 GB RSS limit and a 20 s per-input timeout, and prints one line
# per target: executions, executions per second, corpus size and the outcome.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# TUNENET_FUZZ_RUNS=N also stops each target after N executions, whichever comes first
# (the long campaigns: TUNENET_FUZZ_RUNS=10000000 bash scripts/fuzz.sh 1800).
# TUNENET_FUZZ_PREBUILT=1 runs the binaries already in the cache without building (cargo
# fuzz run would rebuild them first whenever a source file looks newer, which on a busy
# machine can take a campaign's whole half hour); each log names the binary's build time.
#
# Each corpus starts from fuzz/seeds/<target> (real files and signed messages) and grows
# in fuzz/corpus/<target> (not committed). An input that crashes, hangs or runs out of
# memory is copied to fuzz/regressions/<target>/, which `cargo test` runs through the same
# code (crates/node/src/fuzzing.rs) once fixed; the script then exits non-zero.
# Needs the nightly toolchain; installs cargo-fuzz when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
cache="${TUNENET_CACHE:-$HOME/.cache/tunenet}"
target_dir="$cache/fuzz-target"

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

explicit=$#
if [ "$explicit" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^tunenet-fuzz$')
fi

cd fuzz
bin_dir="$target_dir/x86_64-unknown-linux-gnu/release"
if [ -n "${TUNENET_FUZZ_PREBUILT:-}" ]; then
    for t in "${targets[@]}"; do
        [ -x "$bin_dir/$t" ] || { echo "no prebuilt fuzz target $bin_dir/$t: run without TUNENET_FUZZ_PREBUILT first" >&2; exit 2; }
    done
    echo "== ${#targets[@]} prebuilt fuzz targets from $bin_dir (not rebuilt)"
elif [ "$explicit" -gt 0 ]; then
    echo "== building ${#targets[@]} fuzz targets (nightly, AddressSanitizer)"
    for t in "${targets[@]}"; do cargo +nightly fuzz build --target-dir "$target_dir" "$t"; done
else
    echo "== building ${#targets[@]} fuzz targets (nightly, AddressSanitizer)"
    cargo +nightly fuzz build --target-dir "$target_dir"
fi

logs="${TUNENET_FUZZ_LOGS:-$(mktemp -d)}"
mkdir -p "$logs"
failed=()
printf '%-15s %8s %12s %10s %8s  %s\n' target seconds executions "exec/s" corpus outcome
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$logs/$t.log"
    start=$(date +%s)
    set +e
    # The dataset target reads Parquet on a worker thread under a deadline; a worker past
    # its deadline finishes on its own after the input is done, and LeakSanitizer counts
    # its thread bookkeeping (glibc's __cxa_thread_atexit) and what it still holds as
    # leaks, of whatever input runs next and again at exit. Leak checks stay on for every
    # other target.
    extra=()
    if [ -n "${TUNENET_FUZZ_RUNS:-}" ]; then
        extra+=(-runs="$TUNENET_FUZZ_RUNS")
    fi
    asan="${ASAN_OPTIONS:-}"
    if [ "$t" = dataset ]; then
        extra+=(-detect_leaks=0)
        asan="${asan:+$asan:}detect_leaks=0"
    fi
    flags=(-max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=20
        -print_final_stats=1 "${extra[@]}")
    if [ -n "${TUNENET_FUZZ_PREBUILT:-}" ]; then
        echo "binary: $bin_dir/$t, built $(date -u -r "$bin_dir/$t" '+%F %T UTC')" >"$log"
        ASAN_OPTIONS="$asan" "$bin_dir/$t" -artifact_prefix="artifacts/$t/" "${flags[@]}" \
            "corpus/$t" "seeds/$t" >>"$log" 2>&1
    else
        ASAN_OPTIONS="$asan" cargo +nightly fuzz run --target-dir "$target_dir" "$t" \
            "corpus/$t" "seeds/$t" -- "${flags[@]}" >"$log" 2>&1
    fi
    rc=$?
    set -e
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    if [ "$rc" -eq 0 ]; then
        outcome="clean"
    else
        outcome="FAILED (exit $rc; log $log)"
        failed+=("$t")
        mkdir -p "regressions/$t"
        for f in "artifacts/$t"/*; do
            [ -f "$f" ] && cp "$f" "regressions/$t/" && outcome="$outcome; kept $(basename "$f")"
        done
        grep -m 3 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" | sed 's/^/    /' || true
    fi
    printf '%-15s %8s %12s %10s %8s  %s\n' "$t" "$took" "${execs:-?}" "${rate:-?}" "$corpus" "$outcome"
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]} (inputs kept in fuzz/regressions/)"
    exit 1
fi
echo "every target ran clean"
