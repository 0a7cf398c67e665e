#!/usr/bin/env bash
# Checks that the adapters tunenet writes in PEFT's layout load with transformers + PEFT
# and give the same logits as tunenet's own merge of the adapter into the base.
#   scripts/check-peft.sh            (trains a small LoRA on the tiny model first)
# The venv (torch, transformers, peft from PyPI) lives in $TUNENET_CACHE/bench-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${TUNENET_CACHE:-$HOME/.cache/tunenet}"
venv="$cache/bench-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers, peft' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers safetensors peft
fi
cargo build --release --quiet
work=$(mktemp -d)
bin="${CARGO_TARGET_DIR:-target}/release/tunenet"
$bin model init --preset tiny --out "$work/base" >/dev/null
$bin dataset demo --out "$work/data.jsonl" --records 200 >/dev/null
$bin train --model "$work/base" --data "$work/data.jsonl" --out "$work/run" --method lora --rank 8 --steps 30 --lr 0.003 >/dev/null 2>&1
$bin model merge --base "$work/base" --adapter "$work/run/artifact.safetensors" --out "$work/merged" >/dev/null
"$venv/bin/python" - "$work" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
work = sys.argv[1]
ids = torch.tensor([[256] + list(b"What is the capital of Zorbia?")])
base = AutoModelForCausalLM.from_pretrained(f"{work}/base", torch_dtype=torch.float32)
peft = PeftModel.from_pretrained(base, f"{work}/run").eval()
merged = AutoModelForCausalLM.from_pretrained(f"{work}/merged", torch_dtype=torch.float32).eval()
plain = AutoModelForCausalLM.from_pretrained(f"{work}/base", torch_dtype=torch.float32).eval()
with torch.no_grad():
    a, b, c = peft(ids).logits, merged(ids).logits, plain(ids).logits
d = (a - b).abs().max().item()
moved = (a - c).abs().max().item()
print(f"PEFT adapter vs tunenet merge: max |logit diff| {d:.2e}; the adapter moves logits by up to {moved:.3f}")
assert d < 1e-3 and moved > 1e-2, "PEFT and tunenet disagree, or the adapter does nothing"
print("ok: the PEFT layout loads and matches")
PY
