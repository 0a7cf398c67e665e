#!/usr/bin/env bash
# HellaSwag inference benchmark: tunenet's packed scorer against llama.cpp (through
# llama-cpp-python) on SmolLM2-135M-Instruct (GGUF, Q4_1) and the same items, scored the
# same way (sum of the ending tokens' log-probabilities; acc_norm divides by the ending's
# UTF-8 bytes). Prints one JSON line per run, then per-item agreement with llama.cpp.
#
#   scripts/bench-hellaswag.sh [ITEMS] [QUANT_ITEMS]    # defaults 200 and 40
#
# ITEMS synthetic items in HellaSwag's layout (`hellaswag-bench demo`, the generator behind
# `tunenet eval hellaswag-demo`); QUANT_ITEMS of them (a prefix) for the slow runs
# (candle's quantised matmul kernels, llama.cpp at all threads). Each configuration runs
# single-threaded and with every core (RAYON_NUM_THREADS / n_threads).
#
# First run: fetches the GGUF (scripts/fetch-smollm2.sh) and installs llama-cpp-python
# into a venv under ~/.cache/tunenet/llama-venv. PyPI has only its source distribution, so
# pip builds it with cmake (from PyPI too): about 9 minutes on 2 cores. Later runs reuse it.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${TUNENET_CACHE:-${HOME}/.cache/tunenet}"
items="${1:-200}"
quant_items="${2:-40}"
threads_all="$(nproc)"

gguf="$("$root/scripts/fetch-smollm2.sh")"
venv="$cache/llama-venv"
py="$venv/bin/python"
if ! "$py" -c 'import llama_cpp' >/dev/null 2>&1; then
    echo "bench-hellaswag: installing llama-cpp-python into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q cmake ninja numpy
    if ! "$venv/bin/pip" install -q --only-binary=:all: llama-cpp-python 2>/dev/null; then
        echo "bench-hellaswag: no wheel; building llama-cpp-python from source (~9 min on 2 cores)" >&2
        start=$(date +%s)
        CMAKE_BUILD_PARALLEL_LEVEL="$threads_all" \
        CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
            "$venv/bin/pip" install --no-binary llama-cpp-python llama-cpp-python
        echo "bench-hellaswag: built in $(( $(date +%s) - start )) s" >&2
    fi
fi

(cd "$root" && cargo build --release -p tunenet-ml --example hellaswag-bench --features bench-example)
bin="$root/target/release/examples/hellaswag-bench"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$bin" demo "$work/items.jsonl" "$items" 1
head -n "$quant_items" "$work/items.jsonl" > "$work/items-q.jsonl"
# The dense f32 path runs a model directory: the GGUF imported (dequantised).
"$bin" import "$gguf" "$work/f32-dir"

cat > "$work/llama_score.py" <<'PY'
import json, re, sys, time
import numpy as np
import llama_cpp.llama_cpp as llama_cpp
from llama_cpp import Llama

# ggml's AMX kernels (an "extra buffer type") crash where the kernel does not grant AMX
# tile state (seen in this VM); with extra buffer types off the AVX512/VNNI kernels run.
_default_params = llama_cpp.llama_model_default_params
def _params():
    p = _default_params()
    p.use_extra_bufts = False
    return p
llama_cpp.llama_model_default_params = _params

def preprocess(text):
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")

def context_of(it):
    return preprocess(it["activity_label"] + ": " + it["ctx_a"] + " " + it["ctx_b"].capitalize())

def pick(rows, targets):
    rows = rows.astype(np.float64)
    m = rows.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(rows - m).sum(axis=1))
    return float((rows[np.arange(len(targets)), targets] - lse).sum())

gguf, data, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
items = [json.loads(l) for l in open(data) if l.strip()]
llm = Llama(model_path=gguf, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads,
            n_threads_batch=threads, logits_all=True, verbose=False)
tok = lambda s: llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)
start = time.perf_counter()
right = right_norm = tokens = 0
results = []
for idx, it in enumerate(items):
    ctx = context_of(it)
    ctx_ids = tok(ctx)
    wholes, shareds, nbytes = [], [], []
    for e in it["endings"]:
        e = preprocess(e)
        w = tok(ctx + " " + e)
        s = 0
        while s < min(len(w), len(ctx_ids)) and w[s] == ctx_ids[s]:
            s += 1
        wholes.append(w); shareds.append(s); nbytes.append(max(len(e.encode("utf-8")), 1))
    # The context runs once; each ending continues from its KV cache (eval truncates
    # the cache back to n_tokens first).
    p = min(shareds)
    llm.reset()
    llm.eval(ctx_ids[:p])
    lls = []
    for w, s in zip(wholes, shareds):
        llm.n_tokens = p
        if len(w) - 1 > p:
            llm.eval(w[p:-1])
        lls.append(pick(np.asarray(llm.scores[s - 1:len(w) - 1]), np.asarray(w[s:])))
    pred = int(np.argmax(lls)); pred_norm = int(np.argmax([l / b for l, b in zip(lls, nbytes)]))
    right += pred == it["label"]; right_norm += pred_norm == it["label"]
    tokens += sum(len(ctx_ids) + len(w) - s - 1 for w, s in zip(wholes, shareds))
    results.append({"index": idx, "logliks": lls, "pred": pred, "pred_norm": pred_norm,
                    "ending_tokens": [len(w) - s for w, s in zip(wholes, shareds)]})
secs = time.perf_counter() - start
with open(out, "w") as f:
    for r in results:
        f.write(json.dumps(r) + "\n")
n = len(items)
print(json.dumps({"weights": "llama.cpp", "items": n, "acc": right / n, "acc_norm": right_norm / n,
                  "items_per_sec": n / secs, "tokens_per_sec": tokens / secs, "seconds": secs}))
PY

cat > "$work/agree.py" <<'PY'
import json, sys
load = lambda p: {r["index"]: r for r in map(json.loads, open(p))}
a, b = load(sys.argv[1]), load(sys.argv[2])
common = sorted(set(a) & set(b))
same = sum(a[i]["pred_norm"] == b[i]["pred_norm"] for i in common)
same_tok = sum(a[i]["ending_tokens"] == b[i]["ending_tokens"] for i in common)
d = [abs(x - y) for i in common for x, y in zip(a[i]["logliks"], b[i]["logliks"])]
print(json.dumps({"vs": sys.argv[3], "items": len(common), "pred_norm_agree": same / len(common),
                  "same_tokenization": same_tok / len(common),
                  "mean_abs_loglik_diff": sum(d) / len(d), "max_abs_loglik_diff": max(d)}))
PY

echo "bench-hellaswag: $items items ($quant_items for the slow runs), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for t in 1 "$threads_all"; do
    echo "== threads $t"
    RAYON_NUM_THREADS=$t "$bin" score gguf-f32 "$gguf" "$work/items.jsonl" 1024 "$work/tn-gguf-f32-$t.jsonl"
    RAYON_NUM_THREADS=$t "$bin" score dir "$work/f32-dir" "$work/items.jsonl" 1024 "$work/tn-dir-$t.jsonl"
    RAYON_NUM_THREADS=$t "$bin" score gguf "$gguf" "$work/items-q.jsonl" 1024 "$work/tn-gguf-q-$t.jsonl"
    if [[ "$t" == 1 ]]; then
        OMP_NUM_THREADS=1 "$py" "$work/llama_score.py" "$gguf" "$work/items.jsonl" 1 "$work/llama-$t.jsonl"
    else
        OMP_NUM_THREADS=$t "$py" "$work/llama_score.py" "$gguf" "$work/items-q.jsonl" "$t" "$work/llama-$t.jsonl"
    fi
done
echo "== agreement with llama.cpp (single-thread run)"
for run in gguf-f32-1 dir-1 gguf-q-1; do
    "$py" "$work/agree.py" "$work/tn-$run.jsonl" "$work/llama-1.jsonl" "$run"
done
