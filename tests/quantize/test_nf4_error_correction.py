"""nf4 with a low-rank correction of its rounding error: fitted where the inputs are, added by the engine unmerged,
merged into the float twin, and never handed to an engine that would drop it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from quant_helpers import quantize

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from steerserve.nf4_correction import CORRECTION_FILE, load_correction  # noqa: E402
from steerserve.training.quantize.nf4_rounding import low_rank_correction  # noqa: E402

PROBE = "Explain how a refrigerator keeps food cold, step by step, for a curious child."


def _weighted_error(error: torch.Tensor, inputs: torch.Tensor) -> float:
    return torch.linalg.norm(inputs @ error.T).item()


def test_the_correction_cancels_the_error_where_the_inputs_are() -> None:
    generator = torch.Generator().manual_seed(0)
    error = torch.randn(48, 128, generator=generator) * 0.01
    loudness = torch.logspace(-2, 1, 128)[torch.randperm(128, generator=generator)]
    inputs = torch.randn(1024, 128, generator=generator) * loudness  # a few loud channels, as in a transformer
    hessian = inputs.T @ inputs / len(inputs)
    left = {rank: _weighted_error(error - torch.mm(*low_rank_correction(error, hessian, rank)), inputs)
            for rank in (4, 16, 48)}
    before = _weighted_error(error, inputs)
    assert left[4] < 0.8 * before and left[16] < 0.5 * left[4], (before, left)
    assert left[48] < 1e-4 * before  # full rank: the error itself
    u, s, vt = torch.linalg.svd(error)  # the best rank 16 by weights alone leaves more on these inputs
    assert left[16] < 0.8 * _weighted_error(error - (u[:, :16] * s[:16]) @ vt[:16], inputs)
    up, down = low_rank_correction(error, hessian, 500)
    assert up.shape == (48, 48) and down.shape == (48, 128)  # rank capped at the smaller side


def _logits(model: object, tokenizer: object) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0].float()


def test_quantize_stores_the_correction_the_engine_adds_and_the_twin_merges(
        tiny_source: Path, transformers_variants: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerserve.precision import Precision
    from steerserve.server.engines.base import EngineConfig
    from steerserve.server.engines.hf_engine import load_model

    corrected, twin = tmp_path / "nf4-r32", tmp_path / "nf4-r32-twin"
    assert quantize(tiny_source, "nf4", corrected, "--low-rank-correction", "32") == 0
    manifest = json.loads((corrected / "manifest.json").read_text())
    plain = json.loads((transformers_variants["nf4"] / "manifest.json").read_text())
    assert manifest["settings"]["low_rank_correction"] == "32" and manifest["settings"]["rounding"] == "gptq-act-order"
    assert CORRECTION_FILE in " ".join(manifest["notes"])
    factors = load_correction(corrected)
    assert len(factors) == 7 * json.loads((tiny_source / "config.json").read_text())["num_hidden_layers"]
    assert all(up.shape[1] == 32 == down.shape[0] and up.dtype == torch.bfloat16 for up, down in factors.values())
    stored = (corrected / CORRECTION_FILE).stat().st_size
    assert manifest["bytes"] - plain["bytes"] >= stored  # the manifest's size counts the correction

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_source))
    source = _logits(AutoModelForCausalLM.from_pretrained(str(tiny_source), dtype=torch.float32), tokenizer)
    served = {name: _logits(load_model(str(path), EngineConfig(model=str(path), precision=Precision.NF4),
                                       compute_dtype="float32"), tokenizer)
              for name, path in {"plain": transformers_variants["nf4"], "corrected": corrected}.items()}
    drift = {name: (logits - source).norm().item() for name, logits in served.items()}
    assert drift["corrected"] < 0.8 * drift["plain"], drift

    assert quantize(corrected, "fp32", twin) == 0
    assert json.loads((twin / "manifest.json").read_text())["settings"]["low_rank_correction_merged"] == "14 layers"
    assert not (twin / CORRECTION_FILE).exists()  # merged into the float weights, nothing left to add
    merged = _logits(AutoModelForCausalLM.from_pretrained(str(twin), dtype=torch.float32), tokenizer)
    assert torch.allclose(merged, served["corrected"], atol=1e-4), (merged - served["corrected"]).abs().max()


def test_nearest_rounding_takes_a_correction_too(tiny_source: Path, transformers_variants: dict[str, Path],
                                                 tmp_path: Path) -> None:
    out = tmp_path / "nearest-r4"
    assert quantize(tiny_source, "nf4", out, "--rounding", "nearest", "--low-rank-correction", "4") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"] == manifest["settings"] | {"rounding": "nearest", "low_rank_correction": "4"}
    assert manifest["calibration"]["samples"] == 8  # the correction is fitted on the calibration inputs
    assert len(load_correction(out)) > 0


@pytest.mark.parametrize(("precision", "rank", "message"), [
    ("int8", "4", "--low-rank-correction applies to nf4 only, not int8"),
    ("nf4", "-1", "--low-rank-correction must be a rank of 1 or more"),
])
def test_a_correction_nf4_cannot_take_is_refused(tiny_source: Path, tmp_path: Path, precision: str, rank: str,
                                                 message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert quantize(tiny_source, precision, tmp_path / "x", "--low-rank-correction", rank) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_corrected_checkpoint_goes_to_the_engine_that_adds_the_correction(
        tiny_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU whose vLLM has bitsandbytes, nf4 goes to vLLM, whose loader would drop the correction."""
    import shutil

    from steerserve.nf4_correction import save_correction
    from steerserve.server.engines import vllm_args
    from steerserve.server.settings import ServerSettings, VariantSpec
    from steerserve.server.variants import build_variant

    monkeypatch.setattr(vllm_args, "detect_platform", lambda: vllm_args.VLLMPlatform(
        "cuda", device_count=1, quantization_methods=frozenset({"bitsandbytes"}), vllm_version="vllm 0.32.0"))
    checkpoint = shutil.copytree(tiny_source, tmp_path / "nf4-like")
    (checkpoint / "manifest.json").write_text(json.dumps({"name": "tiny", "precision": "nf4"}))
    spec = VariantSpec(path=str(checkpoint))
    settings = ServerSettings(models=[spec], engine="vllm")
    assert build_variant(spec, settings, checkpoint).engine_name == "vllm"
    save_correction(checkpoint, {"model.layers.0.mlp.down_proj": (torch.zeros(128, 2), torch.zeros(2, 256))})
    assert build_variant(spec, settings, checkpoint).engine_name == "transformers"
    pinned = VariantSpec(path=str(checkpoint), engine="vllm")
    with pytest.raises(ValueError, match=f"engine 'vllm'.*{CORRECTION_FILE}.*only the transformers engine adds it"):
        build_variant(pinned, ServerSettings(models=[pinned], engine="vllm"), checkpoint)
