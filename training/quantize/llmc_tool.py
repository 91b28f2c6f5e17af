"""Runs inside the llm-compressor tool environment (not the serving one): calibrate, quantize, save.

    ~/.cache/steerserve/tools/llmcompressor-venv/bin/python llmc_tool.py SPEC.json

Standalone on purpose: that environment has llm-compressor and its own transformers, not steerserve.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def recipe(scheme: str, group_size: int | None = None, scales: str | None = None) -> list[Any]:
    """W4A16: GPTQ on the weights. W8A8: SmoothQuant moves activation outliers into weights first.

    ``group_size`` replaces the preset's 128 for grouped schemes: 128 must divide every input width,
    and small models (hidden size 576) need 64 or 32. ``scales="mse"`` searches each group's clipping for the
    least rounding error (llm-compressor's MSE observer) where the preset takes the group's min and max.
    """
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    if scheme == "W4A16":
        groups = preset_name_to_scheme(scheme, ["Linear"])
        if group_size:
            groups.weights.group_size = group_size
        if scales == "mse":
            groups.weights.observer = "memoryless_mse"
        gptq = GPTQModifier(config_groups={"group_0": groups}, ignore=["lm_head"])
    else:
        gptq = GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    return [SmoothQuantModifier(smoothing_strength=0.8), gptq] if scheme == "W8A8" else [gptq]


def main(spec: dict[str, Any]) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["source"])
    # Calibrate in float32 on a CPU that only emulates bf16 (several times faster there); save in bf16 either way.
    dtype = getattr(torch, spec["calibration_dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype=dtype)
    rows = [tokenizer(t, truncation=True, max_length=spec["max_tokens"]) for t in spec["texts"]]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows])
    modifiers = recipe(spec["scheme"], spec.get("group_size"), spec.get("scales"))
    oneshot(model=model, dataset=dataset, recipe=modifiers, max_seq_length=spec["max_tokens"],
            num_calibration_samples=len(rows))
    model.to(torch.bfloat16).save_pretrained(spec["output"], save_compressed=True)
    if spec.get("eval_set"):
        score_saved(spec, dtype)


def score_saved(spec: dict[str, Any], dtype: Any) -> None:
    """Log-probs of the eval set from the checkpoint just written, reloaded as a reader of it would load it.

    Used where vLLM cannot run the precision on this machine; this environment's transformers
    reads compressed-tensors and decompresses the packed weights, so the numbers are those of the
    stored (quantized) weights.
    """
    import importlib.util

    from transformers import AutoModelForCausalLM

    module_spec = importlib.util.spec_from_file_location("steerserve_scoring", spec["scoring_module"])
    scoring = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(scoring)
    reloaded = AutoModelForCausalLM.from_pretrained(spec["output"], dtype=dtype).eval()
    Path(spec["raw"]).write_text(json.dumps(scoring.score_eval_set(reloaded, spec["eval_set"])))


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
