"""A low-rank correction of nf4's rounding error, stored in 16 bits beside the 4-bit weights.

nf4 keeps each weight as one of 16 codes times its block's scale; what rounding loses, W − Q, is spread over the
whole matrix, but most of what it does to a layer's *outputs* lies in a few directions of the inputs the layer
actually sees. ``steerserve quantize CKPT --precision nf4 --low-rank-correction R`` keeps, per linear layer, the
rank-R product ``up @ down`` (out×R, R×in) that cancels most of that on the calibration inputs
(``nf4_rounding.low_rank_correction``), in ``nf4_error_correction.safetensors`` next to the 4-bit weights. Rank 16
on the default model is about 10 MB (the nf4 weights are ~110 MB) and took the steered default's nf4 perplexity
ratio from 1.096 to 1.075 (``benchmarks/results/steered-default-precisions-avx512/``).

Whoever loads an nf4 checkpoint through ``hf_engine.load_model`` (the transformers engine, quantize's quality
scoring, QLoRA training on it) gets the correction *unmerged*: each 4-bit layer's output gains ``up @ (down @ x)``,
2·R·(in+out) multiply-adds per token, the weights staying 4-bit; an adapter injected later wraps the corrected
layer. Whoever dequantizes the model (its float twin, an adapter merged onto it) adds ``up @ down`` to the float
weights, so both paths compute the same function::

    attach(model, checkpoint)          # after loading; returns 0 when the checkpoint has no correction
    model = model.dequantize(...)      # replaces the 4-bit layers: the hooks go with them
    merge_into_dequantized(model)      # weights += up @ down, for each corrected layer
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

CORRECTION_FILE = "nf4_error_correction.safetensors"
STORED_DTYPE = "bfloat16"
"""16 bits per factor entry, as a LoRA adapter is kept: the correction is small beside the weight it corrects."""
_FACTORS = "_steerserve_nf4_correction"
"""Where ``attach`` leaves the factors on the model, so ``merge_into_dequantized`` can fold them in later."""


def has_correction(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / CORRECTION_FILE).is_file()


def save_correction(directory: Path, factors: Mapping[str, tuple[Any, Any]]) -> Path:
    """Write ``{layer: (up, down)}`` as ``<layer>.up`` / ``<layer>.down`` tensors in 16 bits."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, STORED_DTYPE)
    tensors = {}
    for name, (up, down) in factors.items():
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"{name}: up {tuple(up.shape)} and down {tuple(down.shape)} disagree on the rank")
        tensors[f"{name}.up"] = up.detach().to(dtype).contiguous()
        tensors[f"{name}.down"] = down.detach().to(dtype).contiguous()
    path = Path(directory) / CORRECTION_FILE
    save_file(tensors, str(path), metadata={"format": "steerserve nf4 low-rank error correction"})
    return path


def load_correction(checkpoint: str | Path) -> dict[str, tuple[Any, Any]]:
    """``{layer: (up, down)}`` as stored (16 bits); empty when the checkpoint has none."""
    if not has_correction(checkpoint):
        return {}
    from safetensors.torch import load_file

    tensors = load_file(str(Path(checkpoint) / CORRECTION_FILE))
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    missing = [name for name in names if f"{name}.up" not in tensors or f"{name}.down" not in tensors]
    if missing:
        raise ValueError(f"{checkpoint}/{CORRECTION_FILE}: layers without both factors: {missing[:3]}")
    return {name: (tensors[f"{name}.up"], tensors[f"{name}.down"]) for name in names}


def attach(model: Any, checkpoint: str | Path) -> int:
    """Add each stored correction to its layer's output (forward hooks, in the layer's compute dtype); returns how
    many layers were corrected. A layer the model lacks is an error: the correction belongs to other weights."""
    import torch

    factors = load_correction(checkpoint)
    for name, (up, down) in factors.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{checkpoint}/{CORRECTION_FILE} corrects {name}, which this model lacks") from None
        dtype = getattr(module, "compute_dtype", None) or torch.float32
        module.register_forward_hook(_adds(up.to(dtype), down.to(dtype)))
    if factors:
        setattr(model, _FACTORS, factors)
    return len(factors)


def _adds(up: Any, down: Any) -> Any:
    def hook(_module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
        x = inputs[0]
        return output + ((x.to(down.dtype) @ down.T) @ up.T).to(output.dtype)
    return hook


def merge_into_dequantized(model: Any) -> int:
    """Fold the factors ``attach`` left on ``model`` into its (now float) weights; returns the layers merged."""
    import torch

    factors = getattr(model, _FACTORS, None) or {}
    with torch.no_grad():
        for name, (up, down) in factors.items():
            weight = model.get_submodule(name).weight
            if getattr(weight, "quant_state", None) is not None:
                raise ValueError(f"{name} is still 4-bit: merge the correction after dequantizing")
            weight.add_((up.float() @ down.float()).to(weight.dtype))
    if factors:
        delattr(model, _FACTORS)
    return len(factors)
