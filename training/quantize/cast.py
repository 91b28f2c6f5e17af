"""fp32 / bf16 / fp16: a plain dtype cast of every floating-point weight, served by vLLM or transformers.

    steerserve quantize default --precision fp16 --output runs/smollm2-fp16
"""

from __future__ import annotations

from pathlib import Path

from steerserve.training.quantize.methods import MethodResult, QuantizeJob, copy_tokenizer, versions


def quantize(job: QuantizeJob, work: Path) -> MethodResult:
    """Load in the target dtype and save as safetensors (tied weights stay tied)."""
    from transformers import AutoModelForCausalLM

    dtype = job.precision.torch_dtype_name
    model = AutoModelForCausalLM.from_pretrained(str(job.source), dtype=dtype)
    model.config.dtype = dtype
    model.save_pretrained(work)
    copy_tokenizer(job.source, work)
    return MethodResult(method=f"cast to {dtype}", libraries=versions("torch", "transformers"),
                        scorer="transformers", settings={"dtype": dtype})
