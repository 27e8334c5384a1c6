#!/usr/bin/env python3
"""Makes the LoRA test adapters and their golden logits (run by hand, then commit the output).

For each case below: loads a tiny test model of crates/model/tests/data with transformers,
wraps it in a PEFT LoRA of the given configuration, fills every LoRA matrix with seeded random
values (PEFT starts B at zero, which would make the adapter a no-op), saves the adapter in
PEFT's format (adapter_config.json, adapter_model.safetensors), loads it back from disk as a
user would, and writes golden_logits.json beside it: the logits of every position of a fixed
prompt and the 16 greedy tokens after it.

A case with "trained" instead of "config" is an adapter that `lsplit finetune` trained and wrote
(committed as it came out, see the case): the script only loads it with peft and writes its
golden logits, which checks that peft reads what we write and computes what we compute.

Needs torch (CPU is enough), transformers and peft, e.g.:
    python3 -m venv venv && venv/bin/pip install torch transformers peft safetensors
    venv/bin/python scripts/golden_lora.py
"""

import json
import os
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

DATA = os.path.join(os.path.dirname(__file__), "..", "crates", "model", "tests", "data")
# The prompt of the models' own golden files.
INPUT_IDS = [1, 17, 42, 99, 5, 250, 3, 77, 123, 200, 64, 31]
CASES = [
    # Every module on the first and last layers only: a device adapter of a 1:3 split.
    {
        "model": "tiny-llama-hf",
        "adapter": "lora-head-tail",
        "seed": 19,
        "config": dict(
            r=4,
            lora_alpha=8,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            layers_to_transform=[0, 3],
            use_rslora=False,
        ),
    },
    # rsLoRA (scale alpha / sqrt(r)) on three modules of every layer, over a tied MHA model.
    {
        "model": "tiny-llama-hf-tied",
        "adapter": "lora-rslora-tied",
        "seed": 20,
        "config": dict(
            r=8,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=True,
        ),
    },
    # Trained by `lsplit finetune` (r 4, every module of layers 0 and 3), on the 20 lines of
    # crates/cli/tests/finetune.rs's `data` (written to data.jsonl):
    #   lsplit finetune --data data.jsonl --out lora-finetuned \
    #     --model crates/model/tests/data/tiny-llama-hf --split 1:3 --steps 30 --lr 1e-2 \
    #     --rank 4 --checkpoint-every 0
    # then its checkpoint/ folder removed.
    {"model": "tiny-llama-hf", "adapter": "lora-finetuned", "trained": True},
]


def greedy(model, ids, steps):
    """Greedy tokens after `ids`, each from a full forward pass (no cache)."""
    ids = list(ids)
    out = []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1]
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        ids.append(nxt)
    return out


def make(case):
    os.chdir(DATA)
    out = case["adapter"]
    if not case.get("trained"):
        shutil.rmtree(out, ignore_errors=True)
        base = AutoModelForCausalLM.from_pretrained(case["model"], torch_dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **case["config"]))
        gen = torch.Generator().manual_seed(case["seed"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.save_pretrained(out)

    base = AutoModelForCausalLM.from_pretrained(case["model"], torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        logits = model(torch.tensor([INPUT_IDS])).logits[0]
        golden = {
            "model_dir": case["model"],
            "input_ids": INPUT_IDS,
            "logits_shape": list(logits.shape),
            "logits": [[float(v) for v in row] for row in logits],
            "greedy_next_16": greedy(model, INPUT_IDS, 16),
        }
    # PEFT leaves a README.md (a model card template); the adapter needs only its two files.
    readme = os.path.join(out, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    with open(os.path.join(out, "golden_logits.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
    print(out, "greedy", golden["greedy_next_16"])


if __name__ == "__main__":
    for case in CASES:
        make(case)
