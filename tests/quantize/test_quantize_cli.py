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
                 "quality", "versions", "created")


def test_manifests_are_complete(transformers_variants: dict[str, Path], tiny_source: Path) -> None:
    for precision, path in transformers_variants.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert [k for k in MANIFEST_KEYS if k not in manifest] == [], precision
        assert manifest["precision"] == precision and manifest["name"] == "tiny"
        assert manifest["steering"] == "instructions" and manifest["source"]["path"] == str(tiny_source)
        assert manifest["bytes"] == dir_bytes(path) > 0
        assert manifest["libraries"]["torch"] and manifest["method"]
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
