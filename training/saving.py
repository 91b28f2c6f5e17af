"""Saving a trained run: the servable checkpoint, and with LoRA its adapter beside the merge.

A QLoRA base is dequantized before the merge (peft's merge into 4-bit layers re-quantizes the sum and rounds most
of the adapter away); sharded runs (FSDP, ZeRO-3) gather first and rank 0 rebuilds the merge from the saved
adapter::

    saving.save_model(trainer, tokenizer, run_dir.work, config.lora_base_precision)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerserve.nf4_correction import merge_into_dequantized
from steerserve.training import distributed
from steerserve.training.runner import load_causal_lm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer


def save_model(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, work: Path,
               base_precision: str | None = None) -> None:
    """The full checkpoint at ``work`` (servable); with LoRA also the adapter under ``work/adapter``.

    Under a launcher rank 0 writes: with DDP every rank holds the same weights, so the others skip;
    sharded runs (FSDP, DeepSpeed) go through ``save_sharded``, which needs every rank and, for QLoRA, the
    precision the base trained in (``base_precision``) to rebuild it.
    """
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        save_sharded(trainer, tokenizer, work, base_precision)
        return
    if not distributed.is_main_process():
        return
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(work / "adapter")
        tokenizer.save_pretrained(work / "adapter")
        model = merge_dequantized(model, work / "adapter") if is_quantized(model) else model.merge_and_unload()
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)


def is_quantized(model: Any) -> bool:
    """Whether the (PEFT-wrapped) model holds bitsandbytes weights: a QLoRA run."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def merge_dequantized(model: Any, adapter_dir: Path) -> Any:
    """A QLoRA model as one float checkpoint: the 4-bit base dequantized, the saved adapter merged into it.

    peft's own merge into 4-bit layers re-quantizes the sum, and the 4-bit grid is coarser than most of
    the adapter's update; the dequantized base holds exactly the weights the adapter was trained against.
    """
    return merge_adapter(dequantized(model.unload()), adapter_dir)  # adapter layers removed unmerged first


def dequantized(model: Any, dtype: str = "float32") -> Any:
    """The bitsandbytes model's weights in ``dtype``, saved as the plain float checkpoint they now are (a base
    read from an nf4 checkpoint on disk remembers how it was read, which ``save_pretrained`` cannot reverse).

    An nf4 error correction loaded with the model (``steerserve.nf4_correction``) is added to the float weights.
    Each 4-bit code times its block's scale is computed in ``dtype`` itself, as a float32 engine computes it:
    left alone, bitsandbytes rounds the product through the dtype the weights were quantized from (bf16) first.
    """
    import torch

    target = getattr(torch, dtype)
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            raise ValueError(f"{name}: bitsandbytes repacked this 4-bit weight for its AVX-512 bf16 kernel, "
                             "rounding its block scales to bf16; load the model in float32 (hf_engine.load_model "
                             "with compute_dtype='float32') to keep the stored codes and scales")
        if state is not None:
            state.dtype = target
    model = model.dequantize(dtype=target)
    merge_into_dequantized(model)  # an nf4 error correction the engine added unmerged: now part of the weights
    model._weight_conversions = None
    return model


def merge_adapter(base: Any, adapter_dir: Path) -> Any:
    """``base`` with the adapter saved at ``adapter_dir`` merged into its float weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def merge_saved_adapter(adapter_dir: Path, base_precision: str | None = None) -> Any:
    """The merged checkpoint rebuilt from a saved adapter and the base its config names (a sharded run's rank 0
    holds no whole model to merge into). A QLoRA adapter goes onto its base rounded as it trained (loaded in
    ``base_precision``, then dequantized), so the result is what ``save_model`` writes in one process."""
    base_path = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = load_causal_lm(base_path, base_precision)
    return merge_adapter(dequantized(base) if base_precision is not None else base, adapter_dir)


def save_sharded(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, work: Path,
                 base_precision: str | None = None) -> None:
    """FSDP / ZeRO-3: no rank holds the whole model, so every rank joins ``trainer.save_model``'s gather
    (FULL_STATE_DICT / zero3_save_16bit_model in training/accelerate/) and rank 0 writes; a LoRA adapter
    saved that way is then merged into its base on rank 0 (``merge_saved_adapter``)."""
    lora = hasattr(trainer.accelerator.unwrap_model(trainer.model), "merge_and_unload")
    trainer.save_model(str(work / "adapter" if lora else work))
    if not distributed.is_main_process():
        return
    tokenizer.save_pretrained(work)
    if lora:
        merge_saved_adapter(work / "adapter", base_precision).save_pretrained(work)
