"""Session 27 probe: does any nf4 layout keep the verbosity slider? Greedy transformers ``generate``, first N MT-Bench
prompts at verbosity 0 and 4 (described format, the shipped adapter's), mean characters per level.

    python nf4_probe.py bf16 10 256        # runs/steered-default/q/bf16: the merged adapter, float32
    python nf4_probe.py nf4 10 256         # runs/steered-default/q/nf4: merged, then quantized (what is served)
    python nf4_probe.py qlora 10 256       # the default model in nf4 + the adapter unmerged in float32 (QLoRA layout)
    python nf4_probe.py nf4skip:down_proj 10 256    # merged bf16 quantized at load, these modules left unquantized
"""
import json
import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from steerserve.prompts import SteeringMethod, render_chat

Q, ADAPTER, BASE = "runs/steered-default/q", "models/steered-default/acsft", "~/.cache/steerserve/smollm2-135m-instruct/bf16"
which, count, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)
prompts = [json.loads(line)["turns"][0] for line in open("../shared/data/mt_bench/question.jsonl")][:count]
tokenizer = AutoTokenizer.from_pretrained(f"{Q}/bf16", padding_side="left")


def nf4(skip=()):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=["lm_head", *skip])


if which == "qlora":
    import os
    base = AutoModelForCausalLM.from_pretrained(os.path.expanduser(BASE), quantization_config=nf4(), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, ADAPTER)
elif which.startswith("nf4skip:"):
    model = AutoModelForCausalLM.from_pretrained(f"{Q}/bf16", quantization_config=nf4(which[8:].split(",")),
                                                 dtype=torch.float32)
elif which == "nf4":
    model = AutoModelForCausalLM.from_pretrained(f"{Q}/nf4")
else:
    model = AutoModelForCausalLM.from_pretrained(f"{Q}/bf16", dtype=torch.float32)
model.eval()
for level in (0, 4):
    texts = [render_chat([{"role": "user", "content": p}], {"verbosity": level}, SteeringMethod.DESCRIBED,
                         lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
             for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    started = time.time()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    lengths = [len(tokenizer.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()) for o in out]
    print(which, "verbosity", level, "chars", lengths, "mean", sum(lengths) / len(lengths),
          f"{time.time() - started:.0f}s", flush=True)
