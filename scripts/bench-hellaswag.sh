#!/usr/bin/env bash
# HellaSwag inference benchmark: tunenet's packed scorer against llama.cpp (through
# llama-cpp-python) on SmolLM2-135M-Instruct and the same items, scored the same way (sum
# of the ending tokens' log-probabilities; acc_norm divides by the ending's UTF-8 bytes).
# Prints one JSON line per run, per-item agreement with llama.cpp, then a Markdown table.
#
#   scripts/bench-hellaswag.sh [ITEMS]              # default 200
#   scripts/bench-hellaswag.sh --ceiling [ITEMS]    # the agreement ceiling only (below)
#
# ITEMS synthetic items in HellaSwag's layout (`hellaswag-bench demo`, the generator behind
# `tunenet eval hellaswag-demo`). The same GGUF files go to both sides: the shipped Q4_1
# file, and Q8_0 and Q4_0 files that llama.cpp's own quantizer makes from it (requantised,
# so they hold Q4_1's weights). Each runs single-threaded and with every core
# (RAYON_NUM_THREADS / n_threads), with weights kept quantised on both sides; tunenet also
# runs the Q4_1 file expanded to f32 at load. Every run reports its peak RSS.
#
# A third side checks the arithmetic, not the speed: PyTorch + transformers loads each GGUF
# with its own reader (the `gguf` package expands the blocks to f32) and scores every ending
# in f32 with no cache; the script prints each side's agreement with it, and llama.cpp's on
# the Q4_1 file expanded to f32 by its own quantizer (its products then round nothing).
# HELLASWAG_EXACT=0 skips it. LLAMA_KV=f32 runs llama.cpp with an f32 KV cache (default f16);
# LLAMA_FRESH=1 evaluates each ending from an empty cache instead of the shared context.
# HELLASWAG_KEEP=1 keeps the work folder (the items and every run's per-item scores).
#
# --ceiling measures no speed: on the Q8_0 file it scores the items with tunenet, the exact
# reference, the exact reference with every linear layer's input rounded as ggml's Q8_0
# products round it (blocks of 32, 8-bit values, an f16 scale) in f32 and again in f64
# (and the exact reference in f64, to show how little f32 against f64 moves it unrounded),
# and llama.cpp with its f16 and with an f32 KV cache and as built for another x86 level
# (AVX without AVX2/FMA, a second venv, llama-venv-avx), and prints every pair's acc_norm
# agreement: how far any implementation can agree with llama.cpp's quantised arithmetic,
# and how far llama.cpp agrees with itself.
#
# First run: fetches the GGUF (scripts/fetch-smollm2.sh) and installs llama-cpp-python
# into a venv under ~/.cache/tunenet/llama-venv. PyPI has only its source distribution, so
# pip builds it with cmake (from PyPI too): about 9 minutes on 2 cores. Later runs reuse it.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${TUNENET_CACHE:-${HOME}/.cache/tunenet}"
mode=speed
if [ "${1:-}" = --ceiling ]; then mode=ceiling; shift; fi
items="${1:-200}"
threads_all="$(nproc)"

gguf="$("$root/scripts/fetch-smollm2.sh")"
# install_llama VENV CMAKE_ARGS: llama-cpp-python in VENV, built from source with CMAKE_ARGS
# where PyPI has no wheel (it has none: about 9 minutes on 2 cores, once). No pip cache: a
# wheel built for one venv's flags must not be reused for the other's.
install_llama() {
    "$1/bin/python" -c 'import llama_cpp' >/dev/null 2>&1 && return
    echo "bench-hellaswag: installing llama-cpp-python into $1" >&2
    python3 -m venv "$1"
    "$1/bin/pip" install -q --upgrade pip
    "$1/bin/pip" install -q cmake ninja numpy
    if ! "$1/bin/pip" install -q --only-binary=:all: llama-cpp-python 2>/dev/null; then
        echo "bench-hellaswag: no wheel; building llama-cpp-python from source (~9 min on 2 cores)" >&2
        local start; start=$(date +%s)
        CMAKE_BUILD_PARALLEL_LEVEL="$threads_all" \
        CMAKE_ARGS="$2 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
            "$1/bin/pip" install --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
        echo "bench-hellaswag: built in $(( $(date +%s) - start )) s" >&2
    fi
}
venv="$cache/llama-venv"
py="$venv/bin/python"
install_llama "$venv" "-DGGML_NATIVE=ON"
if [ "$mode" = ceiling ]; then
    # The same llama.cpp built for another x86 level (AVX and F16C, no AVX2 or FMA): its
    # kernels round and sum in another order, as on an older or differently built machine.
    avx_venv="$cache/llama-venv-avx"
    install_llama "$avx_venv" "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_F16C=ON -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_AVX512=OFF"
fi

exact="${HELLASWAG_EXACT:-1}"
tvenv="$cache/bench-venv"
tpy="$tvenv/bin/python"
if { [ "$exact" = 1 ] || [ "$mode" = ceiling ]; } && ! "$tpy" -c 'import torch, transformers, gguf, accelerate' >/dev/null 2>&1; then
    # Recent transformers refuses to load a GGUF without accelerate installed.
    echo "bench-hellaswag: installing torch, transformers, gguf and accelerate into $tvenv" >&2
    [ -x "$tpy" ] || python3 -m venv "$tvenv"
    "$tvenv/bin/pip" install -q torch transformers safetensors gguf accelerate
fi

(cd "$root" && cargo build --release -p tunenet-ml --example hellaswag-bench --features bench-example)
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/hellaswag-bench"

work="$(mktemp -d)"
# HELLASWAG_KEEP=1 keeps the work folder (items, every run's per-item scores) and says where.
if [ -n "${HELLASWAG_KEEP:-}" ]; then
    trap 'echo "bench-hellaswag: work folder kept at $work" >&2' EXIT
else
    trap 'rm -rf "$work"' EXIT
fi
export TQDM_DISABLE=1  # transformers' progress bars while it expands the GGUF
"$bin" demo "$work/items.jsonl" "$items" 1
cp "$gguf" "$work/q4_1.gguf"

cat > "$work/hellaswag_items.py" <<'PY'
# lm-eval's HellaSwag preprocessing, and each ending's tokens, shared with the context up to
# the first token that differs (a space can merge into the ending's first token).
import re

def preprocess(text):
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")

def context_of(it):
    return preprocess(it["activity_label"] + ": " + it["ctx_a"] + " " + it["ctx_b"].capitalize())

def endings(it, tok):
    """(context ids, [(whole ids, shared prefix length, ending bytes)])."""
    ctx = context_of(it)
    ctx_ids = tok(ctx)
    out = []
    for e in it["endings"]:
        e = preprocess(e)
        w = tok(ctx + " " + e)
        s = 0
        while s < min(len(w), len(ctx_ids)) and w[s] == ctx_ids[s]:
            s += 1
        out.append((w, s, max(len(e.encode("utf-8")), 1)))
    return ctx_ids, out
PY

cat > "$work/llama_score.py" <<'PY'
import json, os, resource, sys, time
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

from hellaswag_items import endings

def pick(rows, targets):
    rows = rows.astype(np.float64)
    m = rows.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(rows - m).sum(axis=1))
    return float((rows[np.arange(len(targets)), targets] - lse).sum())

gguf, data, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
items = [json.loads(l) for l in open(data) if l.strip()]
kv = {"type_k": 0, "type_v": 0} if os.environ.get("LLAMA_KV") == "f32" else {}  # GGML_TYPE_F32
fresh = os.environ.get("LLAMA_FRESH") == "1"  # each ending from an empty cache
llm = Llama(model_path=gguf, n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=threads,
            n_threads_batch=threads, logits_all=True, verbose=False, **kv)
tok = lambda s: llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)
start = time.perf_counter()
right = right_norm = tokens = 0
results = []
for idx, it in enumerate(items):
    ctx_ids, ends = endings(it, tok)
    wholes, shareds, nbytes = (list(x) for x in zip(*ends))
    # The context runs once; each ending continues from its KV cache (eval truncates
    # the cache back to n_tokens first).
    p = min(shareds)
    llm.reset()
    llm.eval(ctx_ids[:p])
    lls = []
    for w, s in zip(wholes, shareds):
        if fresh:
            llm.reset()
            llm.eval(w[:-1])
        else:
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
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"weights": "llama.cpp", "items": n, "acc": right / n, "acc_norm": right_norm / n,
                  "items_per_sec": n / secs, "tokens_per_sec": tokens / secs, "seconds": secs,
                  "peak_rss_mib": peak}))
PY

cat > "$work/torch_score.py" <<'PY'
# The exact reference: transformers reads the GGUF itself (the gguf package expands every
# block to f32), and each ending is scored from scratch in f32, log-softmax in f64.
# ROUND=q8 rounds every linear layer's input as ggml's Q8_0 products do before their int8
# dot products: per block of 32, x * (127 / amax) rounded to an integer, times the scale
# amax / 127 stored as f16. PRECISION=f64 runs the whole model in f64.
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hellaswag_items import endings

gguf, data, threads, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
folder, name = os.path.split(os.path.abspath(gguf))
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                             attn_implementation="eager").eval()

def round_q8_0(x):
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    scale = (amax / 127).to(torch.float16).to(x.dtype)
    return (torch.round(blocks * inv) * scale).reshape(x.shape)

if os.environ.get("ROUND") == "q8":
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda mod, args: (round_q8_0(args[0]),))
if os.environ.get("PRECISION") == "f64":
    model.double()
tok = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
items = [json.loads(l) for l in open(data) if l.strip()]
results, right_norm = [], 0
start = time.perf_counter()
with torch.no_grad():
    for idx, it in enumerate(items):
        _, ends = endings(it, tok)
        lls, ntok, nbytes = [], [], []
        for w, s, b in ends:
            lp = torch.log_softmax(model(torch.tensor([w[:-1]])).logits[0].double(), dim=-1)
            lls.append(float(lp[torch.arange(s - 1, len(w) - 1), torch.tensor(w[s:])].sum()))
            ntok.append(len(w) - s); nbytes.append(b)
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / nbytes[i])
        right_norm += pred_norm == it["label"]
        results.append({"index": idx, "logliks": lls, "pred": max(range(len(lls)), key=lls.__getitem__),
                        "pred_norm": pred_norm, "ending_tokens": ntok})
with open(out, "w") as f:
    for r in results:
        f.write(json.dumps(r) + "\n")
label = os.environ.get("PRECISION", "f32") + (", linear inputs rounded to Q8_0" if os.environ.get("ROUND") else "")
print(json.dumps({"weights": f"pytorch {label} (reference)", "items": len(items),
                  "acc_norm": right_norm / len(items), "seconds": time.perf_counter() - start}))
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

cat > "$work/quantize.py" <<'PY'
import ctypes, sys
import llama_cpp
# quantize.py SRC THREADS OUT=TYPE...: TYPE is q8_0, q4_0 or f32.
types = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
         "f32": llama_cpp.LLAMA_FTYPE_ALL_F32}
src, threads = sys.argv[1], int(sys.argv[2])
for out, ftype in (a.rsplit("=", 1) for a in sys.argv[3:]):
    if ftype not in types:
        sys.exit(f"quantize.py: unknown type {ftype!r} for {out} (one of {', '.join(types)})")
    ftype = types[ftype]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.allow_requantize = True
    p.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p))
    if rc != 0:
        sys.exit(f"llama.cpp could not quantize {src} to {out} (code {rc})")
PY

cat > "$work/table.py" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ref = {(r["quant"], r["threads"]): r for r in runs if r["side"] == "llama.cpp"}
print("| run | GGUF | threads | items | items/s | tokens/s | vs llama.cpp | peak RSS MiB | acc_norm |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in runs:
    base = ref.get((r["quant"], r["threads"]))
    ratio = f'{r["items_per_sec"] / base["items_per_sec"]:.2f}x' if base else "-"
    print(f'| {r["label"]} | {r["quant"]} | {r["threads"]} | {r["items"]} | {r["items_per_sec"]:.2f} '
          f'| {r["tokens_per_sec"]:.0f} | {ratio} | {r["peak_rss_mib"]:.0f} | {r["acc_norm"]:.3f} |')
PY

# Q8_0 and Q4_0 files made by llama.cpp's quantizer, so both sides read the same bytes;
# and the Q4_1 file expanded to f32 by it (the same values), for the arithmetic check.
# (--ceiling needs only the Q8_0 file.)
if [ "$mode" = ceiling ]; then
    "$py" "$work/quantize.py" "$gguf" "$threads_all" "$work/q8_0.gguf=q8_0"
else
    "$py" "$work/quantize.py" "$gguf" "$threads_all" "$work/q8_0.gguf=q8_0" "$work/q4_0.gguf=q4_0" "$work/f32.gguf=f32"
fi

if [ "$mode" = ceiling ]; then
    cat > "$work/matrix.py" <<'PY'
# Every pair's acc_norm agreement (share of items where both pick the same ending) and mean
# |difference in summed log-likelihood|, as a Markdown table; arguments are label=path.
import json, sys
runs = [(a.split("=", 1)[0], {r["index"]: r for r in map(json.loads, open(a.split("=", 1)[1]))})
        for a in sys.argv[1:]]
print("| | " + " | ".join(l for l, _ in runs) + " |")
print("| --- |" + " ---: |" * len(runs))
for la, a in runs:
    cells = []
    for lb, b in runs:
        if la == lb:
            cells.append("-")
            continue
        common = sorted(set(a) & set(b))
        same = sum(a[i]["pred_norm"] == b[i]["pred_norm"] for i in common)
        d = [abs(x - y) for i in common for x, y in zip(a[i]["logliks"], b[i]["logliks"])]
        cells.append(f"{100 * same / len(common):.1f} % ({sum(d) / len(d):.2g})")
    print(f"| {la} | " + " | ".join(cells) + " |")
print(f"\n{len(common)} items; each cell: acc_norm choice agreement (mean |Δ loglik| in nats).")
# Where every llama.cpp run picks the same ending, how often each other run picks it too.
llamas = [r for l, r in runs if l.startswith("llama.cpp")]
if len(llamas) > 1:
    firm = [i for i in common if len({r[i]["pred_norm"] for r in llamas}) == 1]
    print(f"\nOn the {len(firm)} items where the {len(llamas)} llama.cpp runs all pick the same ending:")
    for la, a in runs:
        if not la.startswith("llama.cpp"):
            same = sum(a[i]["pred_norm"] == llamas[0][i]["pred_norm"] for i in firm)
            print(f"- {la} picks it on {same} ({100 * same / len(firm):.1f} %)")
PY
    q="$work/q8_0.gguf"
    echo "bench-hellaswag --ceiling: $items items on the Q8_0 file" >&2
    RAYON_NUM_THREADS=1 "$bin" score gguf "$q" "$work/items.jsonl" 1024 "$work/c-tunenet.jsonl"
    OMP_NUM_THREADS=1 "$py" "$work/llama_score.py" "$q" "$work/items.jsonl" 1 "$work/c-llama.jsonl"
    OMP_NUM_THREADS=1 LLAMA_KV=f32 "$py" "$work/llama_score.py" "$q" "$work/items.jsonl" 1 "$work/c-llama-kv.jsonl"
    OMP_NUM_THREADS=1 "$avx_venv/bin/python" "$work/llama_score.py" "$q" "$work/items.jsonl" 1 "$work/c-llama-avx.jsonl"
    "$tpy" "$work/torch_score.py" "$q" "$work/items.jsonl" "$threads_all" "$work/c-exact.jsonl"
    PRECISION=f64 "$tpy" "$work/torch_score.py" "$q" "$work/items.jsonl" "$threads_all" "$work/c-exact64.jsonl"
    ROUND=q8 "$tpy" "$work/torch_score.py" "$q" "$work/items.jsonl" "$threads_all" "$work/c-r32.jsonl"
    ROUND=q8 PRECISION=f64 "$tpy" "$work/torch_score.py" "$q" "$work/items.jsonl" "$threads_all" "$work/c-r64.jsonl"
    "$py" "$work/matrix.py" "tunenet=$work/c-tunenet.jsonl" "exact f32=$work/c-exact.jsonl" \
        "exact f64=$work/c-exact64.jsonl" \
        "rounded f32=$work/c-r32.jsonl" "rounded f64=$work/c-r64.jsonl" \
        "llama.cpp=$work/c-llama.jsonl" "llama.cpp, f32 KV=$work/c-llama-kv.jsonl" \
        "llama.cpp, AVX build=$work/c-llama-avx.jsonl"
    exit 0
fi

results="$work/results.jsonl"
record() { # side label quant threads json
    "$py" -c 'import json,sys; r=json.loads(sys.argv[5]); r.update(side=sys.argv[1], label=sys.argv[2], quant=sys.argv[3], threads=int(sys.argv[4])); print(json.dumps(r))' "$@" >>"$results"
}
echo "bench-hellaswag: $items items, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for t in 1 "$threads_all"; do
    echo "== threads $t"
    out=$(RAYON_NUM_THREADS=$t "$bin" score gguf-f32 "$work/q4_1.gguf" "$work/items.jsonl" 1024 "$work/tn-f32-$t.jsonl")
    echo "$out"; record tunenet "tunenet, expanded to f32 at load" q4_1 "$t" "$out"
    for q in q4_1 q8_0 q4_0; do
        out=$(RAYON_NUM_THREADS=$t "$bin" score gguf "$work/$q.gguf" "$work/items.jsonl" 1024 "$work/tn-$q-$t.jsonl")
        echo "$out"; record tunenet "tunenet, kept quantised" "$q" "$t" "$out"
        out=$(OMP_NUM_THREADS=$t "$py" "$work/llama_score.py" "$work/$q.gguf" "$work/items.jsonl" "$t" "$work/llama-$q-$t.jsonl")
        echo "$out"; record llama.cpp "llama.cpp (shared context)" "$q" "$t" "$out"
    done
done
echo "== agreement with llama.cpp on the same GGUF (single-thread runs)"
"$py" "$work/agree.py" "$work/tn-f32-1.jsonl" "$work/llama-q4_1-1.jsonl" "f32-expanded q4_1"
for q in q4_1 q8_0 q4_0; do
    "$py" "$work/agree.py" "$work/tn-$q-1.jsonl" "$work/llama-$q-1.jsonl" "quantised $q"
done
if [ "$exact" = 1 ]; then
    echo "== agreement with the exact reference (PyTorch f32 on the GGUF's expanded blocks)"
    for q in q4_1 q8_0 q4_0; do
        "$tpy" "$work/torch_score.py" "$work/$q.gguf" "$work/items.jsonl" "$threads_all" "$work/torch-$q.jsonl"
        "$py" "$work/agree.py" "$work/tn-$q-1.jsonl" "$work/torch-$q.jsonl" "tunenet quantised $q vs exact"
        "$py" "$work/agree.py" "$work/llama-$q-1.jsonl" "$work/torch-$q.jsonl" "llama.cpp $q vs exact"
    done
    # llama.cpp on the same weights expanded to f32: its products then take f32 activations
    # (with quantised weights it rounds each block of 32 activations to 8 bits first).
    OMP_NUM_THREADS=1 "$py" "$work/llama_score.py" "$work/f32.gguf" "$work/items.jsonl" 1 "$work/llama-f32-1.jsonl" >/dev/null
    "$py" "$work/agree.py" "$work/llama-f32-1.jsonl" "$work/torch-q4_1.jsonl" "llama.cpp on q4_1 expanded to f32 vs exact"
    "$py" "$work/agree.py" "$work/llama-f32-1.jsonl" "$work/tn-f32-1.jsonl" "llama.cpp on q4_1 expanded to f32 vs tunenet"
fi
echo "== table"
"$py" "$work/table.py" "$results"
