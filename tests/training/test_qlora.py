"""QLoRA (``lora_base_precision: nf4``): the adapter trains on the base exactly as the server's nf4 variant
holds it, the output's top level is that base dequantized with the adapter merged, and the transformers
engine serves the adapter unmerged on the nf4 weights with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import FAST, run_recipe

from steerserve.precision import Precision
from steerserve.server.engines.base import EngineConfig
from steerserve.server.engines.hf_engine import load_model
from steerserve.training.acsft import ACSFTRecipeConfig
from steerserve.training.config import ConfigError, load_config
from steerserve.training.manifest import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
pytest.importorskip("bitsandbytes")

UNTOUCHED = "model.layers.0.mlp.gate_proj.weight"
"""A 4-bit linear weight without an adapter (the recipe's default targets are the attention projections)."""


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, attribute_file: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "acsft-nf4"
    settings = [f"model={tiny_model_dir}", f"data={attribute_file}", "data_format=helpsteer", *FAST[:-1],
                "lora=true", "lora_r=4", "lora_base_precision=nf4", "learning_rate=0.02"]
    return run_recipe("acsft", out, settings)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11]])).logits[0].float()


def served(base: Path, adapter: Path | None) -> torch.nn.Module:
    """The model as the transformers engine loads an nf4 variant (with an unmerged adapter), in float32."""
    config = EngineConfig(model=str(base), precision=Precision.NF4, adapter=str(adapter) if adapter else None)
    return load_model(str(base), config, compute_dtype="float32")


def test_the_adapter_trains_in_float32_on_the_nf4_base(qlora_run: Path, tiny_model_dir: Path) -> None:
    import bitsandbytes.functional as bnbf

    manifest = read_manifest(qlora_run)
    assert manifest["hyperparameters"]["lora_base_precision"] == "nf4" and manifest["steps"] == 3
    adapter = load_file(qlora_run / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())  # not TRL's bf16 cast
    assert max(float(t.abs().max()) for k, t in adapter.items() if "lora_B" in k) > 0  # B starts at zero
    base, merged = load_file(tiny_model_dir / "model.safetensors"), load_file(qlora_run / "model.safetensors")
    weight = base[UNTOUCHED].float()
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    rounded = bnbf.dequantize_4bit(packed, state)
    assert float((rounded - weight).abs().max()) > 1e-4  # nf4 moves the weight...
    torch.testing.assert_close(merged[UNTOUCHED].float(), rounded, rtol=0, atol=1e-6)  # ...and that is what trained


def test_served_unmerged_on_nf4_it_answers_as_the_merged_float_checkpoint(qlora_run: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    with_adapter = logits(served(tiny_model_dir, qlora_run / "adapter"))
    merged = logits(AutoModelForCausalLM.from_pretrained(qlora_run, dtype=torch.float32).eval())
    torch.testing.assert_close(with_adapter, merged, rtol=0, atol=2e-3)
    assert float((with_adapter - logits(served(tiny_model_dir, None))).abs().max()) > 1e-2  # the adapter acts


def test_a_sharded_runs_merge_rebuilds_the_same_checkpoint(qlora_run: Path) -> None:
    """FSDP's rank 0 holds no whole model: it rebuilds the merge from the saved adapter and its base, which for
    QLoRA must be the nf4-rounded base (the float one would answer differently from the nf4 serving)."""
    from steerserve.training.saving import merge_saved_adapter

    written = load_file(qlora_run / "model.safetensors")
    rebuilt = merge_saved_adapter(qlora_run / "adapter", "nf4").state_dict()
    assert set(written) <= set(rebuilt)
    for name, weight in written.items():
        torch.testing.assert_close(rebuilt[name].float(), weight.float(), rtol=0, atol=1e-6, msg=name)
    on_float = merge_saved_adapter(qlora_run / "adapter").state_dict()
    assert float((on_float[UNTOUCHED] - written[UNTOUCHED]).abs().max()) > 1e-4


def test_a_quantized_base_needs_lora_and_a_known_precision(attribute_file: Path) -> None:
    common = [f"data={attribute_file}", "data_format=helpsteer"]
    with pytest.raises(ConfigError, match="lora_base_precision: .*lora: true"):
        load_config(ACSFTRecipeConfig, None, [*common, "lora=false", "lora_base_precision=nf4"])
    with pytest.raises(ConfigError, match="lora_base_precision: 'int4' is not one of nf4"):
        load_config(ACSFTRecipeConfig, None, [*common, "lora=true", "lora_base_precision=int4"])
    assert load_config(ACSFTRecipeConfig, None, [*common, "lora=true"]).lora_base_precision is None


def test_on_a_base_quantize_already_made_nf4_the_adapter_trains_on_the_stored_codes(
        tmp_path: Path, tiny_model_dir: Path, attribute_file: Path) -> None:
    """``steerserve quantize`` rounds nf4 by GPTQ; QLoRA on that checkpoint must keep its codes, not re-round."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    from steerserve.training.quantize.cli import main as quantize_main

    base = tmp_path / "nf4-gptq"
    assert quantize_main([str(tiny_model_dir), "--precision", "nf4", "--output", str(base), "--eval-chars", "800",
                          "--mcq-per-subject", "1", "--mcq-items", "6", "--calibration-samples", "8",
                          "--calibration-max-tokens", "128"]) == 0
    stored_weight = AutoModelForCausalLM.from_pretrained(base).get_submodule(UNTOUCHED.removesuffix(".weight")).weight
    stored_weight.quant_state.dtype = torch.float32  # codes times scales in float32, as the float32 engine does
    stored = bnbf.dequantize_4bit(stored_weight.data, stored_weight.quant_state)
    float_weight = load_file(tiny_model_dir / "model.safetensors")[UNTOUCHED].float()
    nearest = bnbf.dequantize_4bit(*bnbf.quantize_4bit(float_weight, blocksize=64, quant_type="nf4"))
    assert float((stored - nearest).abs().max()) > 1e-4  # GPTQ chose other codes than nearest rounding

    settings = [f"model={base}", f"data={attribute_file}", "data_format=helpsteer", *FAST[:-1],
                "lora=true", "lora_r=4", "lora_base_precision=nf4", "learning_rate=0.02"]
    run = run_recipe("acsft", tmp_path / "acsft-nf4", settings)
    merged = load_file(run / "model.safetensors")[UNTOUCHED].float()
    torch.testing.assert_close(merged, stored, rtol=0, atol=1e-6)
    with_adapter = logits(served(base, run / "adapter"))
    as_merged = logits(AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval())
    torch.testing.assert_close(with_adapter, as_merged, rtol=0, atol=2e-3)


def test_a_float32_engine_keeps_nf4_off_the_bf16_repacking(tiny_model_dir: Path) -> None:
    """On an AVX-512 bf16 CPU bitsandbytes repacks 4-bit weights at the first inference forward, rounding their
    block scales to bf16; the float32 engine must not let it, and a repacked model is refused, not dequantized."""
    import bitsandbytes
    from bitsandbytes.functional import has_avx512bf16

    from steerserve.training.saving import dequantized

    model = served(tiny_model_dir, None)
    before = {name: m.weight.data.clone() for name, m in model.named_modules()
              if isinstance(m, bitsandbytes.nn.Linear4bit)}
    logits(model)  # an inference forward, where the repacking would happen
    after = {name: m for name, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)}
    assert before and all(torch.equal(after[name].weight.data, data) for name, data in before.items())
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in after.values())
    if not has_avx512bf16():
        return  # nothing repacks here: the refusal below cannot be provoked
    module = next(iter(after.values()))
    module.support_avx512bf16_for_cpu = True
    logits(model)
    assert module.weight.quant_state.packing_format_for_cpu
    with pytest.raises(ValueError, match="repacked"):
        dequantized(model)
