"""Stacking two LoRA adapters into one: the serving form of a run trained on another run's merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter_helpers import make_adapter
from steerserve.training.stack_adapters import stack_adapters


def _merged_weights(base: Path, *adapters: Path) -> dict:
    """fp32 weights of ``base`` with each adapter merged in turn (PEFT's own merge)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_stacked_adapter_equals_the_two_applied_in_turn(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    # The first as a training run writes it (merged model + adapter/); the second trained on that merged model,
    # with another rank and alpha and on one layer only, so the union of layers and zero padding are exercised.
    first = make_adapter(tiny_model_dir, tmp_path / "acsft", seed=1, merged=True, rank=4)
    second = make_adapter(first, tmp_path / "dpo", seed=2, rank=8, layers_to_transform=[1])
    stacked = stack_adapters([first / "adapter", second], tmp_path / "stacked")

    config = json.loads((stacked / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["layers_to_transform"]) == (12, 12, None)
    assert (stacked / "tokenizer.json").is_file() and stacked.stat().st_mode & 0o777 == 0o755
    expected = _merged_weights(tiny_model_dir, first / "adapter", second)
    got = _merged_weights(tiny_model_dir, stacked)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    base = _merged_weights(tiny_model_dir)
    moved = [name for name in base if not torch.allclose(base[name], expected[name])]
    assert any(".layers.1." in name for name in moved) and any(".layers.0." in name for name in moved)


def test_stacking_refuses_what_it_cannot_stack_exactly_and_keeps_a_finished_output(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    plain = make_adapter(tiny_model_dir, tmp_path / "plain", seed=1, rank=4)
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", seed=2, rank=4, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        stack_adapters([plain, dora], tmp_path / "out")
    assert not (tmp_path / "out").exists()

    out = stack_adapters([plain, plain], tmp_path / "twice")
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        stack_adapters([plain, plain], out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    stack_adapters([plain, plain], out, force=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
