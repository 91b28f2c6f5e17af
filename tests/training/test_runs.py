"""Config loading, the CLI, and the output directory: atomic commit, --force, resume from a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_helpers import FAST, run_recipe

from steerserve.training.cli import RECIPE_DIR, RECIPES, main
from steerserve.training.config import PROJECT_ROOT, ConfigError, load_config
from steerserve.training.dpo import DPORecipeConfig
from steerserve.training.manifest import is_complete, read_manifest
from steerserve.training.output import OutputExists, checkpoint_problem

# ---- config ------------------------------------------------------------------


def test_every_recipe_ships_a_tiny_yaml_that_loads() -> None:
    for recipe in RECIPES:
        module = __import__(RECIPES[recipe], fromlist=["CONFIG"])
        config = load_config(module.CONFIG, RECIPE_DIR / f"{recipe}-tiny.yaml")
        assert config.model == "tiny"
        assert Path(config.data).is_absolute() or not (PROJECT_ROOT / config.data).exists()


def test_yaml_then_set_overrides_with_types(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text("")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: data.jsonl\ndata_format: hh-rlhf\nbeta: 1\nlora_target_modules: [q_proj]\n")
    config = load_config(DPORecipeConfig, recipe, ["loss_type=robust", "label_smoothing=0.1", "lora=true",
                                                   "lora_target_modules=q_proj,v_proj"], max_steps=7)
    assert config.beta == 1.0 and isinstance(config.beta, float) and config.lora is True
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.max_steps == 7
    assert config.data == str(tmp_path / "data.jsonl")  # relative to the YAML's directory


@pytest.mark.parametrize(("overrides", "message"), [
    (["betta=1"], "unknown setting.*betta"),
    (["loss_type=hinge"], "loss_type: 'hinge' is not one of sigmoid, robust, ipo"),
    (["label_smoothing=0.1"], "label_smoothing: only the robust loss"),
    (["loss_type=robust", "label_smoothing=0.5"], r"label_smoothing: must be in \[0, 0.5\)"),
    (["beta=high"], "beta: expected float"),
    (["sft_weight=-1"], "sft_weight: must be 0"),
    (["ld_alpha=1.5"], r"ld_alpha: must be in \[0, 1\]"),
    (["max_steps"], "expected key=value"),
    (["extra_data=[hh-rlhf]"], "extra_data: 'hh-rlhf' is not FORMAT:PATH"),
    (["extra_data=[aqua:x.json]"], "extra_data: format 'aqua' of 'aqua:x.json' is not one of"),
    (["extra_data=[hh-rlhf:x.jsonl@0]"], "extra_data: .*positive integer"),
])
def test_bad_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(DPORecipeConfig, None, ["data=x.jsonl", "data_format=pairs", *overrides])


def test_default_model_recipes_load() -> None:
    """The recipes behind the steered default model (make steered-default) stay loadable."""
    defaults = sorted(RECIPE_DIR.glob("*-default*.yaml"))
    assert defaults
    for path in defaults:
        recipe = path.name.split("-")[0]
        config = load_config(__import__(RECIPES[recipe], fromlist=["CONFIG"]).CONFIG, path)
        # a relative path resolves against the working directory once that run (apm, acsft) exists there
        assert config.model == "default" or Path(config.model).parts[-3:] in {
            ("runs", "steered-default", "apm"), ("runs", "steered-default", "acsft")}


def test_extra_data_paths_resolve_like_data(tmp_path: Path) -> None:
    (tmp_path / "more.jsonl").write_text("")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: x.jsonl\ndata_format: hh-rlhf\nextra_data: ['pairs:more.jsonl@5']\n")
    config = load_config(DPORecipeConfig, recipe)
    assert config.extra_data == [f"pairs:{tmp_path / 'more.jsonl'}@5"]


def test_help_is_instant_and_lists_settings() -> None:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from steerserve.training.cli import main; main(['dpo', '--help'])"],
                            capture_output=True, text=True, timeout=60)
    assert "label_smoothing" in result.stdout and "loss_type" in result.stdout
    assert time.perf_counter() - started < 10
    probe = "import sys; from steerserve.training import cli; print('torch' in sys.modules or 'trl' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_cli_reports_bad_data_with_location(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    code = main(["dpo", "--output", str(tmp_path / "out"), "--set", f"data={bad}", "--set", "data_format=pairs"])
    assert code == 2
    assert "pairs.jsonl line 2: field 'chosen'" in capsys.readouterr().err


# ---- output: atomic, --force, resume -----------------------------------------


def sft_settings(model: Path, data: Path) -> list[str]:
    return [f"model={model}", f"data={data}", "data_format=mcq", *FAST]


def test_cli_run_then_refuse_then_force(tmp_path: Path, tiny_model_dir: Path, mcq_file: Path) -> None:
    out = tmp_path / "sft"
    argv = ["sft", "--output", str(out), "--max-steps", "1", "--limit", "8",
            *[arg for s in sft_settings(tiny_model_dir, mcq_file) if not s.startswith("max_steps")
              for arg in ("--set", s)]]
    assert main(argv) == 0
    manifest = read_manifest(out)
    assert not is_complete(manifest) and manifest["steps"] == 1 and manifest["hyperparameters"]["limit"] == 8
    # tests run without CUDA: the manifest says the run trained on this CPU, whose cores it counts
    assert manifest["hardware"]["device"] == "cpu" and manifest["hardware"]["cores"] == os.cpu_count()
    assert manifest["hardware"]["name"] and manifest["hardware"]["processes"] == 1
    assert not list(tmp_path.glob(".sft*")), "no temp dirs left behind"
    assert main(argv) == 1 and read_manifest(out)["created"] == manifest["created"]  # refused, untouched
    assert main([*argv, "--force"]) == 0 and read_manifest(out)["steps"] == 1


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path: Path, tiny_model_dir: Path,
                                                          mcq_file: Path) -> None:
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if state.global_step == 3:
                raise KeyboardInterrupt

    settings = [*sft_settings(tiny_model_dir, mcq_file), "max_steps=4"]
    with pytest.raises(KeyboardInterrupt):
        run_recipe("sft", tmp_path / "run", settings, callbacks=(Crash(),))
    partial = tmp_path / ".run.partial"
    assert (partial / "checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "run").exists()
    with pytest.raises(OutputExists, match="different recipe or config"):
        run_recipe("sft", tmp_path / "run", [*settings, "learning_rate=0.001"])
    out = run_recipe("sft", tmp_path / "run", settings)
    manifest = read_manifest(out)
    assert manifest["resumed"] is True and manifest["steps"] == 4
    steps = [json.loads(line)["step"] for line in (out / "logs/train_log.jsonl").read_text().splitlines()]
    assert steps[:4] == [1, 2, 3, 4] and steps.count(2) == 1  # resumed at checkpoint-2, not from scratch
    assert not (out / "checkpoints").exists() and not partial.exists()


def test_a_run_stopped_after_its_final_checkpoint_is_not_trained_again(tmp_path: Path, tiny_model_dir: Path,
                                                                        mcq_file: Path) -> None:
    """Resumed at max_steps the Trainer would take one step more and report that step's loss as the run's."""
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            raise KeyboardInterrupt  # after the final checkpoint and the end-of-training log, before the save

    settings = [*sft_settings(tiny_model_dir, mcq_file), "max_steps=4"]
    with pytest.raises(KeyboardInterrupt):
        run_recipe("sft", tmp_path / "run", settings, callbacks=(Crash(),))
    partial = tmp_path / ".run.partial"
    final = load_file(partial / "checkpoints" / "checkpoint-4" / "model.safetensors")
    logged = [json.loads(line) for line in (partial / "logs/train_log.jsonl").read_text().splitlines()]
    train_loss = next(record["train_loss"] for record in logged if "train_loss" in record)
    out = run_recipe("sft", tmp_path / "run", settings)
    manifest = read_manifest(out)
    assert manifest["resumed"] is True and manifest["steps"] == 4
    assert manifest["metrics"]["train_loss"] == pytest.approx(train_loss, abs=1e-6)
    assert max(json.loads(line)["step"] for line in (out / "logs/train_log.jsonl").read_text().splitlines()) == 4
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[key], final[key]) for key in final if key in saved)
    assert set(final) & set(saved)


def test_damaged_last_checkpoint_is_skipped_not_trusted(tmp_path: Path, tiny_model_dir: Path,
                                                         mcq_file: Path) -> None:
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if state.global_step == 5:
                raise KeyboardInterrupt

    settings = [*sft_settings(tiny_model_dir, mcq_file), "max_steps=6"]
    with pytest.raises(KeyboardInterrupt):
        run_recipe("sft", tmp_path / "run", settings, callbacks=(Crash(),))
    checkpoints = tmp_path / ".run.partial" / "checkpoints"
    weights = checkpoints / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a save cut short
    assert "unreadable" in checkpoint_problem(checkpoints / "checkpoint-4")
    assert checkpoint_problem(checkpoints / "checkpoint-2") is None
    out = run_recipe("sft", tmp_path / "run", settings)
    steps = [json.loads(line)["step"] for line in (out / "logs/train_log.jsonl").read_text().splitlines()]
    assert read_manifest(out)["steps"] == 6
    assert steps.count(3) == 2 and steps.count(2) == 1  # resumed at checkpoint-2: no finished step before it redone


def test_force_discards_a_partial_run_with_other_settings(tmp_path: Path, tiny_model_dir: Path,
                                                         mcq_file: Path) -> None:
    partial = tmp_path / ".run.partial"
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps({"recipe": "dpo", "config": {}}))
    settings = [*sft_settings(tiny_model_dir, mcq_file), "max_steps=1"]
    with pytest.raises(OutputExists):
        run_recipe("sft", tmp_path / "run", settings)
    out = run_recipe("sft", tmp_path / "run", settings, force=True)
    assert read_manifest(out)["resumed"] is False


def test_unknown_data_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing/file.jsonl: no such file"):
        run_recipe("sft", tmp_path / "x", ["data=./missing/file.jsonl", "data_format=mcq", "model=tiny"])


def test_no_training_example_left_is_a_config_error(tiny_model_dir: Path) -> None:
    from steerserve.training import runner
    from steerserve.training.config import ConfigError

    tokenizer = runner.load_tokenizer(str(tiny_model_dir))
    rows = [{"prompt": "word " * 200, "completion": "ok"}]
    with pytest.raises(ConfigError, match="max_length: no training example left of 1 train rows"):
        runner.examples(rows, [], lambda row: row, tokenizer, max_length=64)
    train, test, dropped = runner.examples(rows, [], lambda row: row, tokenizer, max_length=1024)
    assert (len(train), test, dropped) == (1, [], 0)
