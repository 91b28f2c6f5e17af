"""``steerserve quantize``: manifests, refusals, and the transformers-served variants end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from quant_helpers import quantize

from steerserve.training.quantize.methods import dir_bytes

MANIFEST_KEYS = ("name", "precision", "steering", "source", "method", "libraries", "calibration", "bytes",
                 "quality", "versions", "hardware", "created")


def test_manifests_are_complete(transformers_variants: dict[str, Path], tiny_source: Path) -> None:
    for precision, path in transformers_variants.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert [k for k in MANIFEST_KEYS if k not in manifest] == [], precision
        assert manifest["precision"] == precision and manifest["name"] == "tiny"
        assert manifest["steering"] == "instructions" and manifest["source"]["path"] == str(tiny_source)
        assert manifest["bytes"] == dir_bytes(path) > 0
        assert manifest["libraries"]["torch"] and manifest["method"]
        assert manifest["hardware"]["device"] == "cpu" and manifest["hardware"]["cores"] > 0  # where it ran
        for side in ("variant", "source"):
            quality = manifest["quality"][side]
            assert quality["perplexity"] > 1 and quality["perplexity_tokens"] > 10
            assert 0 <= quality["mcq_accuracy"] <= 1 and quality["mcq_items"] == 6
        assert manifest["quality"]["perplexity_ratio"] == pytest.approx(1, abs=0.2)  # same weights, rounded
    if "nf4" in transformers_variants:
        nf4, fp16 = (json.loads((transformers_variants[p] / "manifest.json").read_text()) for p in ("nf4", "fp16"))
        assert nf4["bytes"] < fp16["bytes"] and "bitsandbytes" in nf4["libraries"]


def test_refuses_to_overwrite_without_force(transformers_variants: dict[str, Path], tiny_source: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    output = transformers_variants["fp16"]
    before = (output / "manifest.json").read_text()
    assert quantize(tiny_source, "fp16", output) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert (output / "manifest.json").read_text() == before
    assert quantize(tiny_source, "fp16", output, "--force") == 0
    assert json.loads((output / "manifest.json").read_text())["created"]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None,
                    reason="llama-cpp-python is installed, so GGUF variants are made (tests/quantize/test_gguf.py)")
@pytest.mark.parametrize("precision", ["gguf-q8_0", "gguf-q4_k_m"])
def test_unavailable_precision_says_why_in_one_line(precision: str, tiny_source: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert quantize(tiny_source, precision, tmp_path / "out") == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"steerserve quantize: {precision} cannot be produced here")
    assert "llama-cpp-python" in err or "llama_cpp" in err or "gguf" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_a_lora_adapter_is_merged_into_its_base_and_keeps_its_name(tiny_source: Path, tmp_path: Path) -> None:
    """``steerserve quantize models/steered-default/acsft`` works on the shipped adapter: merged once, named as it."""
    from adapter_helpers import make_adapter
    from safetensors.torch import load_file

    adapter = make_adapter(tiny_source, tmp_path / "steer-lora", seed=3,
                           manifest={"name": "tinysteer", "steering": "described", "base_model": str(tiny_source)})
    cache = tmp_path / "cache"
    assert quantize(adapter, "fp16", tmp_path / "fp16", "--cache-dir", str(cache)) == 0
    manifest = json.loads((tmp_path / "fp16" / "manifest.json").read_text())
    assert manifest["name"] == "tinysteer" and manifest["steering"] == "described"
    assert manifest["source"]["merged_from"] == str(adapter.resolve())
    merged = Path(manifest["source"]["path"])
    assert merged.parent == cache / "merged" and (merged / "config.json").is_file()
    name = "model.layers.0.self_attn.q_proj.weight"
    base_weight, variant_weight = (load_file(str(d / "model.safetensors"))[name].float()
                                   for d in (tiny_source, tmp_path / "fp16"))
    assert (base_weight - variant_weight).abs().max() > 1e-3  # the adapter's delta is in the weights
    stamp = (merged / "model.safetensors").stat().st_mtime_ns
    assert quantize(adapter, "fp16", tmp_path / "fp16-again", "--cache-dir", str(cache)) == 0
    assert (merged / "model.safetensors").stat().st_mtime_ns == stamp  # merged once


def test_scoring_in_an_engine_that_cannot_run_the_precision_is_refused_up_front(
        tiny_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--scorer vllm`` for a 4-bit variant on an AVX2-only CPU fails in one line before any quantization."""
    from steerserve.precision import Precision
    from steerserve.server.engines.vllm_args import detect_platform, precision_unavailable

    if not precision_unavailable(Precision.W4A16, detect_platform()):
        pytest.skip("this machine's vLLM runs w4a16")
    assert quantize(tiny_source, "w4a16", tmp_path / "out", "--scorer", "vllm") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--scorer vllm cannot score w4a16 here" in err and "AVX-512" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("precision", "size", "message"), [
    ("nf4", "32", "--group-size applies to gptq-w4, gptq-w8, w4a16, not nf4"),
    ("gptq-w4", "48", "group size 48 does not divide the linear layers' input widths [128, 256]"),
])
def test_a_group_size_the_precision_cannot_take_is_refused(tiny_source: Path, tmp_path: Path, precision: str,
                                                           size: str, message: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert quantize(tiny_source, precision, tmp_path / "x", "--group-size", size) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("precision", ["nf4", "gptq-w4", "w8a8"])
def test_scales_are_refused_but_for_w4a16(tiny_source: Path, tmp_path: Path, precision: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert quantize(tiny_source, precision, tmp_path / "x", "--scales", "minmax") == 2
    assert f"--scales applies to w4a16 only, not {precision}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_manifest_from_before_a_method_change_is_known_by_its_settings() -> None:
    """w4a16 records its scales since they became MSE-searched; a build without them is the old kind."""
    from steerserve.training.quantize.methods import predates_current_method

    assert predates_current_method({"precision": "w4a16", "settings": {"scheme": "W4A16", "group_size": 32}})
    assert not predates_current_method({"precision": "w4a16", "settings": {"scales": "minmax"}})
    assert not predates_current_method({"precision": "gptq-w4", "settings": {"group_size": 32}})
    assert not predates_current_method({"precision": "not-a-precision"})


def test_gptq_takes_the_group_size_asked(tiny_source: Path, tmp_path: Path) -> None:
    """The tiny model's widths (128, 256) default to groups of 128; 32 keeps four times the scales."""
    if not importlib.util.find_spec("gptqmodel"):
        pytest.skip("gptqmodel is not installed")
    out = tmp_path / "g32"
    assert quantize(tiny_source, "gptq-w4", out, "--group-size", "32") == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["group_size"] == 32
    assert json.loads((out / "quantize_config.json").read_text())["group_size"] == 32


def test_rejects_unknown_calibration_and_quantized_sources(transformers_variants: dict[str, Path],
                                                           tiny_source: Path, tmp_path: Path) -> None:
    assert quantize(tiny_source, "fp16", tmp_path / "a", "--calibration", "nope") == 0  # cast is not calibrated
    if importlib.util.find_spec("gptqmodel"):
        assert quantize(tiny_source, "gptq-w4", tmp_path / "b", "--calibration", "nope") == 2
    if "nf4" in transformers_variants:
        assert quantize(transformers_variants["nf4"], "int8", tmp_path / "c") == 2


def test_transformers_engine_serves_every_variant(transformers_variants: dict[str, Path],
                                                  serve_variants: Callable[..., Any]) -> None:
    with serve_variants(transformers_variants) as (url, client, cards):  # engine: the server's default
        for precision, path in transformers_variants.items():
            card = cards[precision]
            assert card["disk_bytes"] == json.loads((path / "manifest.json").read_text())["bytes"]
            assert card["weight_bytes"] > 0 and card["steering"] == "instructions"
            check_chat_and_mcq(url, client, card["id"])


def check_chat_and_mcq(url: str, client: openai.OpenAI, model: str) -> None:
    """One steered chat completion and one MCQ whose probabilities sum to 1."""
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=4, temperature=0, extra_body={"attributes": {"verbosity": 1}})
    assert reply.usage.completion_tokens >= 1 and reply.model_extra["attributes"]["verbosity"] == 1
    body = {"model": model, "question": "Which is a colour?", "choices": ["red", "run", "rain", "rice"]}
    answer = httpx.post(url + "/v1/mcq", json=body, timeout=60).json()
    assert math.isclose(sum(answer["probabilities"].values()), 1.0, abs_tol=1e-4)
    assert answer["answer"] in "ABCD"


def test_source_quality_is_measured_once_per_source_weights(tiny_source: Path, tmp_path: Path) -> None:
    """Every precision made from one source compares with the same source figures, measured once; new
    weights (or another eval set) are measured afresh."""
    import os

    from steerserve.precision import Precision
    from steerserve.training.quantize.quality import QualityConfig, build_eval_set, measure_source

    eval_set = build_eval_set(tiny_source, QualityConfig(text_chars=800, mcq_per_subject=1, mcq_max_items=6))
    first = measure_source(tiny_source, Precision.BF16, eval_set, tmp_path)
    [remembered] = (tmp_path / "source-quality").glob("*.json")
    assert json.loads(remembered.read_text()) == first and first["perplexity"] > 1
    remembered.write_text(json.dumps({**first, "perplexity": 12345.0}))  # proves the second call reads the file
    assert measure_source(tiny_source, Precision.BF16, eval_set, tmp_path)["perplexity"] == 12345.0
    weights = next(tiny_source.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert measure_source(tiny_source, Precision.BF16, eval_set, tmp_path) == first  # retrained: measured again
    fewer = build_eval_set(tiny_source, QualityConfig(text_chars=800, mcq_per_subject=1, mcq_max_items=3))
    assert measure_source(tiny_source, Precision.BF16, fewer, tmp_path)["mcq_items"] == 3


def test_bitsandbytes_variants_compute_in_this_machines_dtype(transformers_variants: dict[str, Path]) -> None:
    """float32 where the CPU only emulates bf16 (several times faster there), whatever the saved config says."""
    if "nf4" not in transformers_variants:
        pytest.skip("bitsandbytes is not installed")
    import bitsandbytes
    import torch

    from steerserve.precision import Precision, compute_dtype_here
    from steerserve.server.engines.base import EngineConfig
    from steerserve.server.engines.hf_engine import load_model

    for precision in (Precision.NF4, Precision.INT8):
        path = str(transformers_variants[precision.value])
        model = load_model(path, EngineConfig(model=path, precision=precision))
        expected = getattr(torch, compute_dtype_here(precision))
        assert model.get_input_embeddings().weight.dtype == expected, precision
        if precision is Precision.NF4:
            layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
            assert layers and {m.compute_dtype for m in layers} == {expected}
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
        assert logits.dtype == expected and torch.isfinite(logits).all(), precision


def test_a_bitsandbytes_variant_dequantizes_into_its_float_twin(transformers_variants: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """``--precision fp32`` from an nf4 / int8 checkpoint writes the weights it holds as a plain float checkpoint:
    nf4 computes on exactly those weights, so the twin's logits are the nf4 model's; int8 also quantizes its
    activations, so its twin only comes close. Another quantized target stays refused (two roundings)."""
    if "nf4" not in transformers_variants:
        pytest.skip("bitsandbytes is not installed")
    import torch
    from transformers import AutoModelForCausalLM

    from steerserve.precision import Precision
    from steerserve.server.engines.base import EngineConfig
    from steerserve.server.engines.hf_engine import load_model

    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 7]])
    for held, tolerance in (("nf4", 1e-3), ("int8", None)):
        twin = tmp_path / f"{held}-twin"
        assert quantize(transformers_variants[held], "fp32", twin) == 0, held
        manifest = json.loads((twin / "manifest.json").read_text())
        assert manifest["precision"] == "fp32" and manifest["source"]["precision"] == held
        assert manifest["method"] == f"{held} weights dequantized to float32"
        assert manifest["settings"] == {"dtype": "float32", "dequantized_from": held}
        assert "quantization_config" not in json.loads((twin / "config.json").read_text())
        assert abs(manifest["quality"]["perplexity_ratio"] - 1) < 0.05, manifest["quality"]
        float_twin = AutoModelForCausalLM.from_pretrained(str(twin))
        assert {p.dtype for p in float_twin.parameters()} == {torch.float32}
        path = str(transformers_variants[held])
        quantized = load_model(path, EngineConfig(model=path, precision=Precision(held)))
        with torch.inference_mode():
            expected, got = quantized(input_ids=ids).logits.float(), float_twin(input_ids=ids).logits
        if tolerance is not None and quantized.dtype == torch.float32:  # a bf16 engine rounds its own way
            torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.7, held
    assert quantize(transformers_variants["nf4"], "int8", tmp_path / "requantized") == 2
