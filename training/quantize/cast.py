"""fp32 / bf16 / fp16: a plain dtype cast of every floating-point weight, served by vLLM or transformers.

    steerserve quantize default --precision fp16 --output runs/smollm2-fp16

From an int8 or nf4 (bitsandbytes) checkpoint the same command writes its float twin: the packed weights
dequantized (an nf4 error correction stored beside them merged in), nothing else changed, so a benchmark
can sweep what the quantized model says on vLLM's float path:

    steerserve quantize runs/steered-default/q/nf4 --precision fp32 --output runs/steered-default/q/nf4-twin
"""

from __future__ import annotations

from pathlib import Path

from steerserve.nf4_correction import attach as attach_correction
from steerserve.precision import BITSANDBYTES_PRECISIONS, Precision
from steerserve.training.quantize.methods import MethodResult, QuantizeJob, copy_tokenizer, versions


def quantize(job: QuantizeJob, work: Path) -> MethodResult:
    """Load in the target dtype (dequantizing a bitsandbytes source) and save as safetensors (tied weights stay
    tied)."""
    from transformers import AutoModelForCausalLM

    from steerserve.server.variants import read_manifest

    dtype = job.precision.torch_dtype_name
    held = Precision(read_manifest(job.source).get("precision", "bf16"))
    settings = {"dtype": dtype}
    if held in BITSANDBYTES_PRECISIONS:
        from steerserve.training.saving import dequantized

        # Loaded as saved (its quantization_config), then every packed weight replaced by its float value.
        model = AutoModelForCausalLM.from_pretrained(str(job.source), device_map="cpu", dtype=dtype)
        if corrected := attach_correction(model, job.source):
            settings["low_rank_correction_merged"] = str(corrected) + " layers"
        model = dequantized(model, dtype)
        method, libraries = f"{held.value} weights dequantized to {dtype}", ("torch", "transformers", "bitsandbytes")
        settings["dequantized_from"] = held.value
    else:
        model = AutoModelForCausalLM.from_pretrained(str(job.source), dtype=dtype)
        method, libraries = f"cast to {dtype}", ("torch", "transformers")
    model.config.dtype = dtype
    model.save_pretrained(work)
    copy_tokenizer(job.source, work)
    return MethodResult(method=method, libraries=versions(*libraries), scorer="transformers", settings=settings)
