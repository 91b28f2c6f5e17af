"""Session 30 probe: nf4 rounded to the nearest code vs by GPTQ, perplexity and the verbosity slider.

Each layout is built in float32 from the codes and scales bitsandbytes would store (``nf4_rounding.dequantize``,
the values its kernels compute with), so no layout needs a quantized checkpoint on disk. Run from the repository
root; greedy transformers ``generate``, first 10 MT-Bench prompts at verbosity 0 and 4, 256 new tokens
(session 27's probe, ``../steered-default-bootstrap10-precisions/nf4_probe.py``, same prompts and settings):

    python benchmarks/results/nf4-gptq-rounding/probe.py perplexity      # default model: float, nearest, clip, gptq
    python benchmarks/results/nf4-gptq-rounding/probe.py verbosity       # merged steered model + base/adapter layouts
"""
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from steerserve.prompts import SteeringMethod, render_chat
from steerserve.training.acsft import conditioned_example
from steerserve.training.quantize.calibration import calibration_texts, held_out_text
from steerserve.training.quantize.nf4_rounding import BLOCK_SIZE, dequantize, gptq_nf4, input_hessians

BASE = str(Path("~/.cache/steerserve/smollm2-135m-instruct/bf16").expanduser())
MERGED = "runs/steered-default/q/bf16"  # the shipped adapter merged into the base (steerserve quantize ... bf16)
ADAPTER = "models/steered-default/acsft"
ANNOTATIONS = "runs/steered-default/annotate/annotations.jsonl"
CODEBOOK = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                         0.7229568362236023, 1.0])  # bitsandbytes' nf4 code (functional.get_4bit_type("nf4"))
torch.set_num_threads(2)
tokenizer = AutoTokenizer.from_pretrained(BASE, padding_side="left")


def load(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def batches(texts: list[str]) -> list[torch.Tensor]:
    return [tokenizer(t, return_tensors="pt", truncation=True, max_length=512).input_ids for t in texts]


def nearest(weight: torch.Tensor, clip_search: bool = False) -> torch.Tensor:
    """Nearest-code nf4 with the block's absmax, or with the scale (0.6-1.0 of it) of least squared error."""
    blocks = weight.reshape(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(1, keepdim=True).clamp_min(1e-12)
    midpoints = (CODEBOOK[1:] + CODEBOOK[:-1]) / 2
    best, best_error = None, None
    for factor in (torch.linspace(0.6, 1.0, 21).tolist() if clip_search else [1.0]):
        scale = absmax * factor
        values = CODEBOOK[torch.bucketize((blocks / scale).clamp(-1, 1), midpoints)] * scale
        error = ((values - blocks) ** 2).sum(1, keepdim=True)
        if best is None:
            best, best_error = values, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, values, best), torch.where(better, error, best_error)
    return best.reshape(weight.shape)


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The layers bitsandbytes makes 4-bit in this model: every linear of the decoder layers (not lm_head)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


def rounded(path: str, how: str, calibration: list[str] | None = None) -> torch.nn.Module:
    model = load(path)
    linears = decoder_linears(model)
    hessians = input_hessians(model, linears, batches(calibration)) if how == "gptq" else {}
    with torch.no_grad():
        for name, linear in linears.items():
            if how == "gptq":
                linear.weight.data = dequantize(*gptq_nf4(linear.weight, hessians.pop(name), CODEBOOK), CODEBOOK)
            else:
                linear.weight.data = nearest(linear.weight.data, clip_search=how == "clip")
    return model


@torch.no_grad()
def perplexity(model: torch.nn.Module) -> float:
    ids = tokenizer(held_out_text(8000), return_tensors="pt").input_ids[:, :2048]
    return math.exp(model(ids, labels=ids).loss.item())


@torch.no_grad()
def verbosity(name: str, model: torch.nn.Module) -> None:
    prompts = [json.loads(line)["turns"][0] for line in open("../shared/data/mt_bench/question.jsonl")][:10]
    means = []
    for level in (0, 4):
        texts = [render_chat([{"role": "user", "content": p}], {"verbosity": level}, SteeringMethod.DESCRIBED,
                             lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
                 for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=256, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        chars = [len(tokenizer.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()) for o in out]
        means.append(sum(chars) / len(chars))
        print(name, "verbosity", level, chars, flush=True)
    print(f"{name}: perplexity {perplexity(model):.3f}, chars {means[0]:.1f} -> {means[1]:.1f} (x{means[1] / means[0]:.2f})",
          flush=True)


def steering_rows(count: int) -> list[str]:
    """AC-SFT rows as trained (attribute line + description in the system turn, reply), shuffled with seed 0."""
    rows = [json.loads(line) for line in open(ANNOTATIONS)]
    random.Random(0).shuffle(rows)
    rows = rows[:count]
    return [ex["prompt"] + ex["completion"] for ex in
            (conditioned_example(row, SteeringMethod.DESCRIBED, tokenizer) for row in rows)]


if __name__ == "__main__":
    started = time.time()
    oasst = calibration_texts("oasst1", 128)  # what steerserve quantize calibrates on by default
    if sys.argv[1] == "perplexity":
        print(f"float32 {perplexity(load(BASE)):.3f}", flush=True)
        for how in ("nearest", "clip", "gptq"):
            print(f"{how} {perplexity(rounded(BASE, how, oasst)):.3f}", flush=True)
    else:
        verbosity("merged, float32", load(MERGED))
        verbosity("merged, nf4 nearest", rounded(MERGED, "nearest"))
        verbosity("merged, nf4 gptq (oasst1)", rounded(MERGED, "gptq", oasst))
        verbosity("merged, nf4 gptq (AC-SFT rows)", rounded(MERGED, "gptq", steering_rows(128)))
        verbosity("base nf4 gptq + float adapter unmerged", PeftModel.from_pretrained(rounded(BASE, "gptq", oasst),
                                                                                      ADAPTER).eval())
    print(f"{time.time() - started:.0f} s", flush=True)
