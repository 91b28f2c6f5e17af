"""int8 (LLM.int8) and nf4 with bitsandbytes, served by the transformers engine.

    steerserve quantize default --precision nf4 --output runs/smollm2-nf4                      # GPTQ, act order
    steerserve quantize default --precision nf4 --rounding nearest --output runs/smollm2-nf4-rtn
    steerserve quantize default --precision nf4 --low-rank-correction 16 --output runs/smollm2-nf4-r16

bitsandbytes 0.50.2 quantizes on CPU, and ``save_pretrained`` of the quantized model
round-trips on CPU (checked: reloaded logits are identical), so the output holds the
quantized weights and their ``quantization_config``; the engine loads them as they are.
nf4's codes are chosen by GPTQ on the calibration set unless ``rounding`` is ``nearest``
(bitsandbytes' own rounding; ``nf4_rounding`` says why); ``--low-rank-correction R`` adds a rank-R correction of
each layer's rounding error beside the 4-bit weights (``steerserve.nf4_correction``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steerserve.nf4_correction import CORRECTION_FILE, save_correction
from steerserve.precision import Precision
from steerserve.training.quantize.calibration import calibration_entry, calibration_texts
from steerserve.training.quantize.methods import MethodResult, QuantizeJob, copy_tokenizer, require, versions

INSTALL_HINT = "pip install bitsandbytes==0.50.2 torch==2.13.0 (or: pip install -e '.[quant]')"


def bnb_config(precision: Precision) -> Any:
    """The ``BitsAndBytesConfig`` the transformers engine uses for this precision (same settings)."""
    from steerserve.server.engines.base import EngineConfig
    from steerserve.server.engines.hf_engine import load_kwargs

    return load_kwargs(EngineConfig(model="", precision=precision))["quantization_config"]


def quantize(job: QuantizeJob, work: Path) -> MethodResult:
    """Quantize at load with bitsandbytes on CPU, then save the packed weights."""
    require("bitsandbytes", INSTALL_HINT)
    from transformers import AutoModelForCausalLM

    config = bnb_config(job.precision)
    model = AutoModelForCausalLM.from_pretrained(
        str(job.source), dtype=job.precision.torch_dtype_name, quantization_config=config, device_map="cpu"
    )
    gptq = job.precision is Precision.NF4 and job.rounding.uses_gptq
    corrected = job.precision is Precision.NF4 and job.low_rank_correction > 0
    calibration, corrections = _calibrate_nf4(job, model) if gptq or corrected else (None, {})
    model.save_pretrained(work)
    copy_tokenizer(job.source, work)
    if corrections:
        save_correction(work, corrections)
    settings = {k: v for k, v in config.to_dict().items() if k.startswith(("load_in", "bnb_4bit", "llm_int8_thr"))}
    if job.precision is Precision.NF4:
        settings["rounding"] = job.rounding.value
    if corrected:
        settings["low_rank_correction"] = job.low_rank_correction
    return MethodResult(
        method=f"bitsandbytes {job.precision.value}" + (", GPTQ rounding" if gptq else ""),
        libraries=versions("bitsandbytes", "torch", "transformers"),
        scorer="transformers",
        calibration=calibration,
        settings={k: str(v) for k, v in settings.items()},
        notes=["pre-quantized weights saved with save_pretrained; the transformers engine loads them as saved"]
        + ([f"nf4 codes chosen by GPTQ error feedback (Hessians of the unquantized model's layer inputs; "
            f"{'largest inputs first' if job.rounding.act_order else 'column order'}); "
            "same codebook, scales and layout as bitsandbytes' own"] if gptq else [])
        + ([f"rank-{job.low_rank_correction} correction of each layer's rounding error on the calibration inputs "
            f"in {CORRECTION_FILE} (16 bits), added unmerged by the transformers engine"] if corrected else []),
    )


def _calibrate_nf4(job: QuantizeJob, quantized: Any) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """What the calibration set decides for nf4: GPTQ-chosen codes in place of the nearest ones (unless rounding is
    nearest) and, when asked, each layer's low-rank error correction; returns the calibration entry and the
    corrections ``{layer: (up, down)}``."""
    import bitsandbytes
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerserve.training.quantize.nf4_rounding import (
        dequantize, gptq_nf4, input_hessians, low_rank_correction, read_nf4, write_nf4,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(job.source))
    texts = calibration_texts(job.calibration, job.calibration_samples, job.source)
    batches = [tokenizer(text, return_tensors="pt", truncation=True, max_length=job.calibration_max_tokens).input_ids
               for text in texts]
    layers = {name: module for name, module in quantized.named_modules()
              if isinstance(module, bitsandbytes.nn.Linear4bit)}  # what bitsandbytes chose to quantize
    source = AutoModelForCausalLM.from_pretrained(str(job.source), dtype=torch.float32).eval()
    hessians = input_hessians(source, layers, batches)
    corrections = {}
    for name, module in layers.items():
        codebook = module.weight.quant_state.code.float().cpu()
        weight, hessian = source.get_submodule(name).weight.detach().float(), hessians.pop(name)
        if job.rounding.uses_gptq:
            indices, absmax = gptq_nf4(weight, hessian, codebook, act_order=job.rounding.act_order)
            write_nf4(module, indices, absmax)
        else:
            indices, absmax = read_nf4(module)
        if job.low_rank_correction:
            error = weight - dequantize(indices, absmax, codebook)
            corrections[name] = low_rank_correction(error, hessian, job.low_rank_correction)
    return calibration_entry(job.calibration, len(texts), job.calibration_max_tokens), corrections


def check(precision: Precision) -> None:
    require("bitsandbytes", INSTALL_HINT)
