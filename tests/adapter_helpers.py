"""PEFT LoRA adapters with random non-zero weights on a tiny checkpoint, in the layouts training writes.

    training_output = make_adapter(base, tmp / "sft-lora", seed=1, merged=True)   # OUT/ + OUT/adapter/
    bare = make_adapter(base, tmp / "mcq-lora", seed=2)                         # adapter files only

A freshly initialised LoRA is a no-op (B = 0); these have both A and B random (std 0.2),
so the adapter visibly changes next-token probabilities and greedy text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(
    base: Path,
    out: Path,
    *,
    seed: int,
    merged: bool = False,
    rank: int = 8,
    manifest: dict[str, Any] | None = None,
    **lora_options: Any,
) -> Path:
    """Write an adapter for ``base``; with ``merged`` as a training output (merged model at ``out``,
    adapter under ``out/adapter``). Returns ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LLAMA_MODULES, init_lora_weights=False,
                        task_type="CAUSAL_LM", **lora_options)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapter_dir = out / "adapter" if merged else out
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    if merged:
        peft_model.merge_and_unload().to(torch.bfloat16).save_pretrained(out)
        tokenizer.save_pretrained(out)
    if manifest is not None:
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def reference_logprobs(base: Path, adapter_dir: Path | None, prompt_ids: list[int], candidates: list[int]) -> list[float]:
    """fp32 next-token log-probs of ``candidates`` from transformers (+ the unmerged PEFT adapter)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)[candidates].tolist()
