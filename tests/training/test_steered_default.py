"""Packaging the steered default's adapters: what `make steered-default` ships into the repo."""

from __future__ import annotations

import json
from pathlib import Path

from steerserve.steered_default import ADAPTERS, package, shipped_adapters


def _fake_lora_run(run: Path, steering: str, **manifest: object) -> None:
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (run / "model.safetensors").write_bytes(b"\0" * 4096)  # the merged model: never shipped
    (run / "manifest.json").write_text(json.dumps({"recipe": run.name, "steering": steering, **manifest}))


def test_package_ships_adapters_with_manifests_only(tmp_path: Path) -> None:
    runs, shipped = tmp_path / "runs", tmp_path / "models"
    _fake_lora_run(runs / "acsft", "described")
    _fake_lora_run(runs / "mcq", "instructions")
    (runs / "dpo-robust").mkdir(parents=True)  # unfinished: skipped, not half-copied
    written = package(runs, shipped)
    assert sorted(p.name for p in written) == ["acsft", "mcq"]
    assert sorted(f.name for f in (shipped / "acsft").iterdir()) == ["adapter_config.json",
                                                                      "adapter_model.safetensors", "manifest.json"]
    manifest = json.loads((shipped / "acsft" / "manifest.json").read_text())
    assert manifest["name"] == ADAPTERS["acsft"] == "steered" and manifest["steering"] == "described"
    assert shipped_adapters(shipped) == {"acsft": shipped / "acsft", "mcq": shipped / "mcq"}
    assert not [p for p in shipped.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    assert (shipped / "acsft").stat().st_mode & 0o777 == 0o755  # readable by whoever serves it
    package(runs, shipped)  # repackaging replaces in place
    assert shipped_adapters(shipped)["acsft"] == shipped / "acsft"


def test_serve_without_models_adds_the_shipped_adapters(tmp_path: Path) -> None:
    from steerserve.steered_default import default_model_specs

    runs, shipped = tmp_path / "runs", tmp_path / "models"
    _fake_lora_run(runs / "acsft", "described")
    package(runs, shipped)
    specs = default_model_specs(shipped)
    assert [s.path for s in specs] == ["default", str(shipped / "acsft")]
    assert specs[1].base == "smollm2-135m-instruct:bf16" and specs[0].base is None
    assert [s.path for s in default_model_specs(tmp_path / "nothing")] == ["default"]


def test_an_adapter_trained_on_nf4_is_served_on_the_nf4_default_model(tmp_path: Path) -> None:
    from steerserve.steered_default import default_model_specs

    runs, shipped = tmp_path / "runs", tmp_path / "models"
    _fake_lora_run(runs / "acsft", "described")
    _fake_lora_run(runs / "acsft-nf4", "described", hyperparameters={"lora": True, "lora_base_precision": "nf4"})
    package(runs, shipped)
    specs = default_model_specs(shipped)
    assert [(s.path, s.precision, s.base) for s in specs] == [
        ("default", None, None), ("default", "nf4", None),
        (str(shipped / "acsft"), None, "smollm2-135m-instruct:bf16"),
        (str(shipped / "acsft-nf4"), None, "smollm2-135m-instruct:nf4"),
    ]
    # steered:nf4 is the float adapter merged and quantized; the QLoRA adapter has an id of its own
    assert json.loads((shipped / "acsft-nf4" / "manifest.json").read_text())["name"] == "steered-qlora"


def test_a_run_trained_on_another_lora_run_ships_as_one_stacked_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    from adapter_helpers import make_adapter
    from steerserve.steered_default import lora_chain

    runs, shipped = tmp_path / "runs", tmp_path / "models"
    acsft = make_adapter(tiny_model_dir, runs / "acsft", seed=1, merged=True, rank=4,
                         manifest={"recipe": "acsft", "base_model": str(tiny_model_dir)})
    dpo = make_adapter(acsft, runs / "dpo-sliders", seed=2, merged=True, rank=8,
                       manifest={"recipe": "dpo", "base_model": str(acsft)})
    assert lora_chain(dpo) == [acsft / "adapter", dpo / "adapter"] and lora_chain(acsft) == [acsft / "adapter"]
    written = package(runs, shipped, adapters={"dpo-sliders": "steered"})
    assert written == [shipped / "dpo-sliders"]
    config = json.loads((shipped / "dpo-sliders" / "adapter_config.json").read_text())
    manifest = json.loads((shipped / "dpo-sliders" / "manifest.json").read_text())
    assert config["r"] == config["lora_alpha"] == 12
    assert manifest["name"] == "steered" and manifest["recipe"] == "dpo"
    assert [m["recipe"] for m in manifest["stacked_on"]] == ["acsft"]
    assert sorted(f.name for f in (shipped / "dpo-sliders").iterdir()) == ["adapter_config.json",
                                                                            "adapter_model.safetensors",
                                                                            "manifest.json"]
