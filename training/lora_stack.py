"""Stack LoRA adapters trained one on top of another into one adapter on the first one's base.

A recipe that trains on an earlier run's merged checkpoint (attribute-conditioned DPO on top of AC-SFT) leaves
an adapter whose base is that checkpoint, not the model the server starts from. Two LoRA deltas add up to one
of their summed rank, exactly: ``s1·B1A1 + s2·B2A2 = [s1·B1 | s2·B2] · [A1 ; A2]``. So the stack is a plain
LoRA adapter of rank ``r1 + r2`` (scale 1, each adapter's scale folded into its B) on the first adapter's base,
which the server merges or serves like any other: one file shipped instead of a chain of merged checkpoints.
Modules or layers only one adapter touches get zero blocks from the other, so the sum stays exact; a module
the config's union of targets x layers names but neither adapter trained (q_proj of a layer only the other
adapter touched) is left to peft's default init, whose zero B adds nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# adapter options whose weights are not a plain B·A delta (or not per-module uniform): refused, not mis-summed
UNSUPPORTED = ("use_dora", "alpha_pattern", "rank_pattern", "modules_to_save", "layer_replication",
               "trainable_token_indices", "target_parameters")


def read_config(adapter: Path) -> dict[str, Any]:
    """The adapter's config, checked to be one whose weights stack exactly."""
    config = json.loads((adapter / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter}: peft_type {config.get('peft_type')!r}, only LORA adapters stack")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"{adapter}: trained biases do not stack as a low-rank delta")
    for key in UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"{adapter}: {key}={config[key]!r} is not supported when stacking adapters")
    return config


def scale(config: dict[str, Any]) -> float:
    """The factor peft multiplies B·A by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _modules(weights: dict[str, Any]) -> set[str]:
    return {key.removesuffix(".lora_A.weight") for key in weights if key.endswith(".lora_A.weight")}


def stack_weights(adapters: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """(config, weights) per adapter, in training order -> the stacked adapter's weights (scale 1)."""
    import torch

    stacked = {}
    for module in sorted(set().union(*(_modules(weights) for _, weights in adapters))):
        present = [(config, weights) for config, weights in adapters if f"{module}.lora_A.weight" in weights]
        in_features = present[0][1][f"{module}.lora_A.weight"].shape[1]
        out_features = present[0][1][f"{module}.lora_B.weight"].shape[0]
        a_blocks, b_blocks = [], []
        for config, weights in adapters:
            a, b = weights.get(f"{module}.lora_A.weight"), weights.get(f"{module}.lora_B.weight")
            if a is None:  # this adapter leaves the module alone: a zero block keeps the ranks aligned
                a = torch.zeros(config["r"], in_features)
                b = torch.zeros(out_features, config["r"])
            a_blocks.append(a.float())
            b_blocks.append(b.float() * scale(config))
        stacked[f"{module}.lora_A.weight"] = torch.cat(a_blocks, dim=0).contiguous()
        stacked[f"{module}.lora_B.weight"] = torch.cat(b_blocks, dim=1).contiguous()
    return stacked


def stacked_config(configs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first adapter's config with the summed rank, scale 1 and the union of what the adapters touch."""
    config = dict(configs[0])
    rank = sum(c["r"] for c in configs)
    layers = [c.get("layers_to_transform") for c in configs]
    config.update(
        r=rank, lora_alpha=rank, use_rslora=False, lora_dropout=0.0, inference_mode=True, init_lora_weights=True,
        target_modules=sorted(set().union(*(_as_set(c["target_modules"]) for c in configs))),
        layers_to_transform=None if any(lay is None for lay in layers) else sorted(
            set().union(*(_as_set(lay) for lay in layers))),
    )
    return config


def _as_set(value: Any) -> set:
    if isinstance(value, str):  # peft takes a regex string for target_modules: no union to take
        raise ValueError(f"target_modules given as a pattern ({value!r}) cannot be stacked; list the modules")
    return {value} if isinstance(value, int) else set(value)


def stack_adapters(adapters: list[Path], output: Path, force: bool = False) -> Path:
    """Write the stack of ``adapters`` (first trained first) to ``output``, atomically; returns it."""
    from safetensors.torch import load_file, save_file

    if len(adapters) < 2:
        raise ValueError("stacking needs two adapters or more")
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass force to replace it")
    configs = [read_config(adapter) for adapter in adapters]
    weights = [load_file(str(adapter / WEIGHTS_FILE)) for adapter in adapters]
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save_file(stack_weights(list(zip(configs, weights))), str(work / WEIGHTS_FILE), metadata={"format": "pt"})
        (work / CONFIG_FILE).write_text(json.dumps(stacked_config(configs), indent=2, sort_keys=True) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(work, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output
