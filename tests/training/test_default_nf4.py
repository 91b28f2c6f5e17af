"""``default:nf4``: the default model quantized once by ``steerserve quantize`` into the cache, the one checkpoint a
QLoRA adapter of the default model trains on and is served on (both see the same GPTQ-rounded codes); and
``steered:nf4``: the shipped SteerLM adapter merged into the default model and quantized once the same way.

The cache's default checkpoint is a tiny model here (the real one takes minutes to quantize on 2 cores); the
quantization, training, packaging and serving are the real ones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from live_server import LiveServer
from training_helpers import FAST, run_recipe

from steerserve.default_model import DEFAULT_MODEL_NAME, default_precision, quantized_default_dir, resolve_default
from steerserve.precision import Precision
from steerserve.training.acsft import ACSFTRecipeConfig
from steerserve.training.config import ConfigError, load_config
from steerserve.training.manifest import read_manifest
from steerserve.training.quantize.methods import SETTINGS_RECORDED_SINCE

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
pytest.importorskip("bitsandbytes")


def _tiny_default(cache: Path, tiny_model_dir: Path) -> Path:
    """The tiny model where default_model_dir keeps the converted default model, as if converted there."""
    converted = cache / DEFAULT_MODEL_NAME / "bf16"
    shutil.copytree(tiny_model_dir, converted)
    (converted / "manifest.json").write_text(json.dumps({"name": DEFAULT_MODEL_NAME, "precision": "bf16",
                                                         "steering": "instructions"}))
    return converted


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
    converted = _tiny_default(cache, tiny_model_dir)
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
    with monkeypatch.context() as changed:  # once nf4's method changes, the cached base is outdated: not served
        changed.setitem(SETTINGS_RECORDED_SINCE, Precision.NF4, "a-setting-nf4-builds-record-from-now-on")
        assert [s.path for s in default_model_specs(shipped, cache_dir=cache)] == ["default"]

    settings = ServerSettings(models=specs, engine="transformers", cache_dir=cache, max_model_len=512)
    with LiveServer(create_app(settings)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        cards = {card.id: card.model_dump() for card in client.models.list().data}
        assert set(cards) == {f"{DEFAULT_MODEL_NAME}:bf16", f"{DEFAULT_MODEL_NAME}:nf4", "steered-qlora:nf4"}
        assert cards["steered-qlora:nf4"]["base"] == f"{DEFAULT_MODEL_NAME}:nf4"
        assert cards["steered-qlora:nf4"]["served_as"] == "unmerged"
        reply = client.chat.completions.create(model="steered-qlora:nf4", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0, extra_body={"attributes": {"verbosity": 4}})
        assert reply.usage.completion_tokens >= 1


def test_steered_nf4_is_the_shipped_adapter_merged_and_quantized_once(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import steerserve.steered_default as steered_default
    from adapter_helpers import make_adapter
    from steerserve.server.app import create_app
    from steerserve.server.settings import ServerSettings, VariantSpec
    from steerserve.steered_default import (
        default_model_specs, quantized_steered_dir, quantized_steered_path, steered_precision,
    )

    assert [steered_precision(t) for t in ("steered:nf4", "steered", "steered-qlora:nf4", "runs/steered:nf4")] == [
        "nf4", None, None, None]
    cache, shipped = tmp_path / "cache", tmp_path / "models"
    converted = _tiny_default(cache, tiny_model_dir)
    adapter_manifest = {"name": "steered", "recipe": "acsft", "base_model": DEFAULT_MODEL_NAME, "steering": "described"}
    make_adapter(converted, shipped / "acsft", seed=1, rank=4, manifest=adapter_manifest)
    with pytest.raises(ValueError, match="steered:bf16 is the shipped adapter on the default model"):
        quantized_steered_dir(cache, "bf16", shipped)
    with pytest.raises(ValueError, match="steered:nf5: unknown precision"):
        quantized_steered_dir(cache, "nf5", shipped)
    # Not built yet: a plain serve offers the adapter alone (and logs how to build steered:nf4)
    assert [s.path for s in default_model_specs(shipped, cache_dir=cache)] == ["default", str(shipped / "acsft")]

    monkeypatch.setattr(steered_default, "SHIPPED_DIR", shipped)
    settings = ServerSettings(models=[VariantSpec(path="steered:nf4")], engine="transformers", cache_dir=cache,
                              max_model_len=512)
    with LiveServer(create_app(settings)) as server:  # builds it before it serves
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        cards = {card.id: card.model_dump() for card in client.models.list().data}
        assert set(cards) == {"steered:nf4"}
        assert (cards["steered:nf4"]["steering"], cards["steered:nf4"]["adapter"]) == ("described", False)
        reply = client.chat.completions.create(model="steered:nf4", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0, extra_body={"attributes": {"verbosity": 4}})
        assert reply.usage.completion_tokens >= 1

    built = quantized_steered_path(cache, "nf4", shipped)
    manifest = read_manifest(built)
    assert (manifest["name"], manifest["precision"], manifest["settings"]["rounding"]) == (
        "steered", "nf4", "gptq-act-order")  # quantize's defaults, not default:nf4's pinned column order
    assert manifest["source"]["merged_from"] == str(shipped / "acsft")
    assert cards["steered:nf4"]["root"] == str(built)
    stamp = (built / "manifest.json").stat().st_mtime_ns
    assert quantized_steered_dir(cache, "nf4", shipped) == built
    assert (built / "manifest.json").stat().st_mtime_ns == stamp  # built once
    assert [s.path for s in default_model_specs(shipped, cache_dir=cache)] == [
        "default", str(built), str(shipped / "acsft")]
    # A retrained adapter is another source: it builds elsewhere, and the old build is not served for it
    make_adapter(converted, shipped / "acsft", seed=2, rank=4, manifest=adapter_manifest)
    assert quantized_steered_path(cache, "nf4", shipped) != built
    assert str(built) not in [s.path for s in default_model_specs(shipped, cache_dir=cache)]


def test_steered_gptq_w4_pins_groups_of_32_in_a_folder_of_its_own(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A build made with quantize's default groups (as before the pin) is never served as ``steered:gptq-w4``."""
    import importlib.util

    from adapter_helpers import make_adapter
    from steerserve.steered_default import built_steered_specs, quantized_steered_dir, quantized_steered_path

    if not importlib.util.find_spec("gptqmodel"):
        pytest.skip("gptqmodel is not installed")
    cache, shipped = tmp_path / "cache", tmp_path / "models"
    converted = _tiny_default(cache, tiny_model_dir)
    make_adapter(converted, shipped / "acsft", seed=1, rank=4,
                 manifest={"name": "steered", "recipe": "acsft", "base_model": DEFAULT_MODEL_NAME})
    unpinned = quantized_steered_path(cache, "nf4", shipped).with_name("gptq-w4")
    unpinned.mkdir(parents=True)
    (unpinned / "manifest.json").write_text(json.dumps({"name": "steered", "precision": "gptq-w4"}))
    built = quantized_steered_dir(cache, "gptq-w4", shipped)
    assert built == unpinned.with_name("gptq-w4-group-size-32")
    manifest = read_manifest(built)
    assert (manifest["precision"], manifest["settings"]["group_size"]) == ("gptq-w4", 32)
    assert json.loads((built / "quantize_config.json").read_text())["group_size"] == 32
    assert [s.path for s in built_steered_specs(shipped, cache)] == [str(built)]
    pinned = [subprocess.run([sys.executable, "-m", "steerserve.steered_default", "pinned", p], capture_output=True,
                             text=True, check=True).stdout.split() for p in ("gptq-w4", "nf4")]
    assert pinned == [["--group-size", "32"], []]  # what make steered-precisions adds to each quantize


def test_a_steered_build_from_before_its_method_changed_is_not_served(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A cached ``steered:w4a16`` with min-max scales (its manifest records no ``scales``) is left out of what
    ``steerserve serve`` serves with no ``--model``; one made the current way is served."""
    from adapter_helpers import make_adapter
    from steerserve.steered_default import built_steered_specs, quantized_steered_path

    cache, shipped = tmp_path / "cache", tmp_path / "models"
    converted = _tiny_default(cache, tiny_model_dir)
    make_adapter(converted, shipped / "acsft", seed=1, rank=4,
                 manifest={"name": "steered", "recipe": "acsft", "base_model": DEFAULT_MODEL_NAME})
    build = quantized_steered_path(cache, "w4a16", shipped)
    build.mkdir(parents=True)
    settings = {"scheme": "W4A16", "group_size": 32}
    (build / "manifest.json").write_text(json.dumps({"name": "steered", "precision": "w4a16", "settings": settings}))
    assert built_steered_specs(shipped, cache) == []
    settings["scales"] = "mse"
    (build / "manifest.json").write_text(json.dumps({"name": "steered", "precision": "w4a16", "settings": settings}))
    assert [s.path for s in built_steered_specs(shipped, cache)] == [str(build)]
