"""nf4 with GPTQ rounding: the same bitsandbytes format, codes chosen so the layers' outputs stay closer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from quant_helpers import quantize

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from steerserve.training.quantize.nf4_rounding import dequantize, gptq_nf4, pack  # noqa: E402


def _layer_and_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight matrix and correlated inputs (as a transformer's hidden states are), 2 blocks per row."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 128, generator=generator) * 0.05
    mixing = torch.randn(128, 128, generator=generator) / 128**0.5 + torch.eye(128)
    inputs = torch.randn(512, 128, generator=generator) @ mixing
    return weight, inputs


def _nf4_state(weight: torch.Tensor) -> tuple[torch.Tensor, object]:
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    return packed, state


def test_gptq_codes_keep_a_layers_outputs_closer_than_nearest_rounding() -> None:
    weight, inputs = _layer_and_inputs()
    packed, state = _nf4_state(weight)
    nearest = bnb_functional.dequantize_4bit(packed, state)
    indices, absmax = gptq_nf4(weight, inputs.T @ inputs / len(inputs), state.code.float())
    assert torch.equal(absmax, state.absmax)  # the scales bitsandbytes stores, untouched
    gptq = dequantize(indices, absmax, state.code.float())
    error = {name: torch.linalg.norm(inputs @ (weight - q).T).item() for name, q in
             {"nearest": nearest, "gptq": gptq}.items()}
    assert error["gptq"] < 0.8 * error["nearest"], error
    assert (gptq != nearest).float().mean() > 0.1  # many codes moved, not a copy of nearest rounding


def test_packed_codes_are_what_bitsandbytes_dequantizes() -> None:
    weight, inputs = _layer_and_inputs(1)
    packed, state = _nf4_state(weight)
    codebook = state.code.float()
    nearest_indices = torch.bucketize((weight.reshape(-1, 64) / state.absmax[:, None]).clamp(-1, 1),
                                      (codebook[1:] + codebook[:-1]) / 2).reshape(weight.shape)
    assert torch.equal(pack(nearest_indices), packed)  # the layout is bitsandbytes' own
    indices, absmax = gptq_nf4(weight, inputs.T @ inputs / len(inputs), codebook)
    state.absmax = absmax
    assert torch.equal(bnb_functional.dequantize_4bit(pack(indices), state), dequantize(indices, absmax, codebook))


def test_quantize_records_the_rounding_and_nearest_is_bitsandbytes_own(
        transformers_variants: dict[str, Path], tiny_source: Path, tmp_path: Path) -> None:
    if "nf4" not in transformers_variants:
        pytest.skip("bitsandbytes is not installed")
    from transformers import AutoModelForCausalLM

    assert quantize(tiny_source, "nf4", tmp_path / "nearest", "--rounding", "nearest") == 0
    manifests = {name: json.loads((path / "manifest.json").read_text())
                 for name, path in {"gptq": transformers_variants["nf4"], "nearest": tmp_path / "nearest"}.items()}
    assert manifests["gptq"]["settings"]["rounding"] == "gptq-act-order" and "GPTQ" in manifests["gptq"]["method"]
    assert manifests["gptq"]["calibration"]["samples"] == 8
    assert manifests["nearest"]["settings"]["rounding"] == "nearest" and manifests["nearest"]["calibration"] is None

    source = AutoModelForCausalLM.from_pretrained(str(tiny_source), dtype=torch.float32)
    models = {name: AutoModelForCausalLM.from_pretrained(str(path)) for name, path in
              {"gptq": transformers_variants["nf4"], "nearest": tmp_path / "nearest"}.items()}
    name = "model.layers.0.mlp.down_proj"
    weight = source.get_submodule(name).weight.detach().float()
    own_packed, own_state = _nf4_state(weight)
    saved = {key: model.get_submodule(name).weight for key, model in models.items()}
    assert torch.equal(saved["nearest"].data.cpu().reshape(-1), own_packed.reshape(-1))
    assert torch.equal(saved["gptq"].quant_state.absmax.cpu(), own_state.absmax)  # same scales, other codes
    assert not torch.equal(saved["gptq"].data.cpu().reshape(-1), own_packed.reshape(-1))


def test_rounding_is_refused_for_other_precisions(tiny_source: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert quantize(tiny_source, "fp16", tmp_path / "x", "--rounding", "gptq") == 2
    assert "--rounding applies to nf4 only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_act_order_rounds_the_loudest_inputs_first_and_keeps_the_layout() -> None:
    weight, inputs = _layer_and_inputs(2)
    loudness = torch.logspace(-1, 1, 128)[torch.randperm(128, generator=torch.Generator().manual_seed(3))]
    inputs = inputs * loudness  # inputs of very unequal size, as a transformer's channels are
    hessian = inputs.T @ inputs / len(inputs)
    codebook = _nf4_state(weight)[1].code.float()
    plain, plain_absmax = gptq_nf4(weight, hessian, codebook)
    ordered, ordered_absmax = gptq_nf4(weight, hessian, codebook, act_order=True)
    assert torch.equal(plain_absmax, ordered_absmax) and ordered.shape == plain.shape and ordered.max() < 16
    error = {name: torch.linalg.norm(inputs @ (weight - dequantize(codes, plain_absmax, codebook)).T).item()
             for name, codes in {"plain": plain, "act_order": ordered}.items()}
    assert error["act_order"] < 0.9 * error["plain"], error


def test_chat_calibration_is_rendered_as_the_checkpoint_is_served(tiny_source: Path, tmp_path: Path) -> None:
    import shutil

    from steerserve.attributes import parse_attributes
    from steerserve.training.quantize.calibration import calibration_entry, calibration_texts

    with pytest.raises(ValueError, match="chat template"):
        calibration_texts("oasst1-chat", 4)
    with pytest.raises(ValueError, match="oasst1-chat"):
        calibration_texts("oasst2", 4)
    steered = shutil.copytree(tiny_source, tmp_path / "steered")
    (steered / "manifest.json").write_text(json.dumps({"name": "tiny", "steering": "described"}))
    texts = calibration_texts("oasst1-chat", 30, steered)
    assert len(texts) == 30
    lines = [next(line for line in text.splitlines() if line.startswith("<extra_id_2>")) for text in texts]
    sliders = [parse_attributes(line.removeprefix("<extra_id_2>")) for line in lines]
    assert [s["verbosity"] for s in sliders[:6]] == [0, 1, 2, 3, 4, 0]
    assert {(s["verbosity"], s["complexity"]) for s in sliders[:25]} == {(v, c) for v in range(5) for c in range(5)}
    assert all(text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>") for text in texts)
    assert "Answer in one short sentence" in texts[0]  # the described method's plain-language line
    plain = calibration_texts("oasst1-chat", 2, tiny_source)  # no manifest: served with plain instructions
    assert "<extra_id_2>" not in plain[0] and plain[0].startswith("<|im_start|>system\n")
    assert calibration_entry("oasst1-chat", 30, 128)["rendering"].startswith("served chat prompt")


def test_quantize_calibrates_nf4_on_served_chats_in_column_order(tiny_source: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "nf4-chat"
    assert quantize(tiny_source, "nf4", out, "--calibration", "oasst1-chat", "--rounding", "gptq") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["name"] == "oasst1-chat" and manifest["calibration"]["samples"] == 8
    assert manifest["settings"]["rounding"] == "gptq" and "GPTQ" in manifest["method"]
    assert manifest["quality"]["variant"]["perplexity"] > 1
