"""int8 (LLM.int8) and nf4 with bitsandbytes, served by the transformers engine.

    steerserve quantize default --precision nf4 --output runs/smollm2-nf4

bitsandbytes 0.50.2 quantizes on CPU, and ``save_pretrained`` of the quantized model
round-trips on CPU (checked: reloaded logits are identical), so the output holds the
quantized weights and their ``quantization_config``; the engine loads them as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steerserve.precision import Precision
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
    model.save_pretrained(work)
    copy_tokenizer(job.source, work)
    settings = {k: v for k, v in config.to_dict().items() if k.startswith(("load_in", "bnb_4bit", "llm_int8_thr"))}
    return MethodResult(
        method=f"bitsandbytes {job.precision.value}",
        libraries=versions("bitsandbytes", "torch", "transformers"),
        scorer="transformers",
        settings={k: str(v) for k, v in settings.items()},
        notes=["pre-quantized weights saved with save_pretrained; the transformers engine loads them as saved"],
    )


def check(precision: Precision) -> None:
    require("bitsandbytes", INSTALL_HINT)
