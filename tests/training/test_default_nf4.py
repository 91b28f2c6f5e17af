"""``default:nf4``: the default model quantized once by ``steerserve quantize`` into the cache, the one checkpoint a
QLoRA adapter of the default model trains on and is served on (both see the same GPTQ-rounded codes).

The cache's default checkpoint is a tiny model here (the real one takes minutes to quantize on 2 cores); the
quantization, training, packaging and serving are the real ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest
from live_server import LiveServer
from training_helpers import FAST, run_recipe

from steerserve.default_model import DEFAULT_MODEL_NAME, default_precision, quantized_default_dir, resolve_default
from steerserve.training.acsft import ACSFTRecipeConfig
from steerserve.training.config import ConfigError, load_config
from steerserve.training.manifest import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
pytest.importorskip("bitsandbytes")


def test_default_names_parse_and_unknown_precisions_are_refused(tmp_path: Path) -> None:
    assert [default_precision(t) for t in ("default", "default:nf4", "defaults", "runs/default")] == [
        "bf16", "nf4", None, None]
    assert resolve_default("runs/x", tmp_path) is None
    with pytest.raises(ValueError, match="default:nf5: unknown precision; one of .*nf4"):
        resolve_default("default:nf5", tmp_path)


def test_a_quantized_default_trains_only_a_qlora_adapter(attribute_file: Path) -> None:
    common = ["model=default:nf4", f"data={attribute_file}", "data_format=helpsteer"]
    with pytest.raises(ConfigError, match="model: default:nf4 is quantized; .*lora_base_precision: nf4"):
        load_config(ACSFTRecipeConfig, None, [*common, "lora=true"])
    assert load_config(ACSFTRecipeConfig, None, [*common, "lora=true", "lora_base_precision=nf4"]).model == \
        "default:nf4"  # not taken for a path


def test_default_nf4_is_built_once_trained_on_and_serves_the_packaged_adapter(
        tmp_path: Path, tiny_model_dir: Path, attribute_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from steerserve.server.app import create_app
    from steerserve.server.settings import ServerSettings
    from steerserve.steered_default import default_model_specs, package

    cache = tmp_path / "cache"
    converted = cache / DEFAULT_MODEL_NAME / "bf16"  # where default_model_dir keeps the converted default model
    shutil.copytree(tiny_model_dir, converted)
    (converted / "manifest.json").write_text(json.dumps({"name": DEFAULT_MODEL_NAME, "precision": "bf16",
                                                         "steering": "instructions"}))
    monkeypatch.setenv("STEERSERVE_CACHE_DIR", str(cache))

    runs = tmp_path / "runs"
    run = run_recipe("acsft", runs / "acsft-nf4", ["model=default:nf4", f"data={attribute_file}",
                                                   "data_format=helpsteer", *FAST[:-1], "lora=true", "lora_r=4",
                                                   "lora_base_precision=nf4", "learning_rate=0.02"])
    built = cache / DEFAULT_MODEL_NAME / "nf4"
    base_manifest = read_manifest(built)
    assert (base_manifest["precision"], base_manifest["settings"]["rounding"]) == ("nf4", "gptq")
    assert base_manifest["source"]["path"] == str(converted)
    assert read_manifest(run)["base_model"] == f"{DEFAULT_MODEL_NAME}:nf4"
    stamp = (built / "manifest.json").stat().st_mtime_ns
    assert quantized_default_dir(cache, "nf4") == built and (built / "manifest.json").stat().st_mtime_ns == stamp

    shipped = tmp_path / "models"
    package(runs, shipped)
    # Not built in a cache: the shipped adapter waits (a first serve does not quantize for minutes)
    assert [s.path for s in default_model_specs(shipped, cache_dir=tmp_path / "fresh")] == ["default"]
    specs = default_model_specs(shipped, cache_dir=cache)
    assert [(s.path, s.precision, s.base) for s in specs] == [
        ("default", None, None), ("default:nf4", None, None),
        (str(shipped / "acsft-nf4"), None, f"{DEFAULT_MODEL_NAME}:nf4")]

    settings = ServerSettings(models=specs, engine="transformers", cache_dir=cache, max_model_len=512)
    with LiveServer(create_app(settings)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        cards = {card.id: card.model_dump() for card in client.models.list().data}
        assert set(cards) == {f"{DEFAULT_MODEL_NAME}:bf16", f"{DEFAULT_MODEL_NAME}:nf4", "steered:nf4"}
        assert cards["steered:nf4"]["base"] == f"{DEFAULT_MODEL_NAME}:nf4"
        assert cards["steered:nf4"]["served_as"] == "unmerged"
        reply = client.chat.completions.create(model="steered:nf4", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0, extra_body={"attributes": {"verbosity": 4}})
        assert reply.usage.completion_tokens >= 1
