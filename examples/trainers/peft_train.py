#!/usr/bin/env python3
"""A complete external trainer for tunenet miners: PyTorch + transformers + PEFT.

    [training]
    command = ["python3", "examples/trainers/peft_train.py"]

The miner runs it once per job with the job file's path as the last argument (see
docs/TRAINERS.md). It trains a LoRA adapter on the job's records within the job's bounds,
stops on its own before `stop_by_unix_ms` (and on SIGTERM), and saves the adapter with
`save_pretrained` into `output_dir`, which the miner turns into its submission.

Needs: pip install torch transformers peft safetensors
"""
import json
import math
import os
import random
import signal
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

job = json.load(open(sys.argv[-1]))
bounds, suggested = job["hparams"], job["suggested"]
stop_by = job["stop_by_unix_ms"] / 1000.0
# Leave time to save: stop taking steps this many seconds before the miner's stop time.
SAVE_SECS = 5.0

stopping = False


def on_term(_sig, _frame):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, on_term)

device = job["devices"][0] if job["devices"] else "cpu"
if device.startswith("cuda"):
    # The miner sets CUDA_VISIBLE_DEVICES to this job's GPUs, so they count from 0 here.
    device = "cuda:0"
dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32

base = job["base_model"]
tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(base, "tokenizer.json"))
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=dtype).to(device)
config = json.load(open(os.path.join(base, "config.json")))

rank = max(1, min(int(suggested.get("lora_rank", 8)), int(bounds["max_lora_rank"])))
lr = min(max(float(suggested.get("learning_rate", 2e-3)), bounds["min_learning_rate"]), bounds["max_learning_rate"])
max_len = min(int(suggested.get("max_seq_len", 128)), int(bounds["max_seq_len"]))
batch = int(suggested.get("batch_size", 8))
max_steps = int(suggested.get("max_steps", 200))

model = get_peft_model(
    model,
    LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
)


def encode(record):
    if "text" in record:
        text = record["text"]
    else:
        text = record["prompt"] + record["response"]
    ids = tok.encode(text)
    bos = config.get("bos_token_id")
    if bos is not None:
        ids = [bos] + ids
    return ids[:max_len]


records = [json.loads(line) for line in open(job["train_data"]) if line.strip()]
examples = [e for e in (encode(r) for r in records) if len(e) >= 2]
random.seed(suggested.get("seed", 0))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
pad = config.get("eos_token_id") or 0

model.train()
step, started = 0, time.time()
while step < max_steps and not stopping and time.time() < stop_by - SAVE_SECS:
    chunk = random.sample(examples, min(batch, len(examples)))
    width = max(len(e) for e in chunk)
    ids = torch.tensor([e + [pad] * (width - len(e)) for e in chunk], device=device)
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in chunk], device=device)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    step += 1
    if step % 10 == 0 or step == 1:
        print(f"step {step} loss {loss.item():.4f} ({time.time() - started:.1f} s)", flush=True)

if not math.isfinite(loss.item()):
    print("the loss is not finite; not saving", file=sys.stderr)
    sys.exit(1)
model.save_pretrained(job["output_dir"])
print(f"saved a rank-{rank} adapter after {step} steps", flush=True)
