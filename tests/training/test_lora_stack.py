"""Stacking LoRA adapters trained one on top of another: the stack on the first base equals the chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steerserve.training.lora_stack import stack_adapters


def _random_adapter(base: Path | torch.nn.Module, out: Path, *, r: int, alpha: int, targets: list[str],
                    layers: list[int] | None, seed: int, rslora: bool = False) -> torch.nn.Module:
    """A LoRA adapter with random A and B (not the zero-B init) saved to ``out``; returns the merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = base if isinstance(base, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, layers_to_transform=layers,
                        init_lora_weights=False, use_rslora=rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return peft_model.merge_and_unload()


def _apply(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def test_stack_equals_the_chain_of_merges(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Second adapter trained on the first's merged weights, other modules, other layers, rsLoRA scale."""
    first = _random_adapter(tiny_model_dir, tmp_path / "first", r=4, alpha=8, targets=["q_proj", "v_proj"],
                            layers=[0], seed=0)
    chain = _random_adapter(first, tmp_path / "second", r=2, alpha=3, targets=["v_proj", "down_proj"],
                            layers=None, seed=1, rslora=True).state_dict()
    out = stack_adapters([tmp_path / "first", tmp_path / "second"], tmp_path / "stacked")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["layers_to_transform"]) == (6, 6, None)
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    stacked = _apply(tiny_model_dir, out)
    base = _apply(tiny_model_dir, tmp_path / "first")  # sanity: the second adapter changed something
    assert max((chain[k] - base[k]).abs().max().item() for k in chain) > 1e-3
    assert stacked.keys() == chain.keys()
    for key in chain:
        torch.testing.assert_close(stacked[key], chain[key], atol=1e-5, rtol=1e-5)


def test_stack_refuses_what_it_cannot_sum_and_keeps_finished_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    _random_adapter(tiny_model_dir, tmp_path / "a", r=2, alpha=2, targets=["q_proj"], layers=None, seed=0)
    _random_adapter(tiny_model_dir, tmp_path / "b", r=2, alpha=2, targets=["q_proj"], layers=None, seed=1)
    out = stack_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        stack_adapters([tmp_path / "b", tmp_path / "a"], out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    stack_adapters([tmp_path / "b", tmp_path / "a"], out, force=True)
    assert (out / "adapter_model.safetensors").read_bytes() != before
    dora = json.loads((tmp_path / "b" / "adapter_config.json").read_text()) | {"use_dora": True}
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(dora))
    with pytest.raises(ValueError, match="use_dora"):
        stack_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "dora")
    assert not (tmp_path / "dora").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
