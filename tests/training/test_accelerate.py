"""Training across processes with ``accelerate launch`` and the configs in training/accelerate/.

On CPU: a real 2-process DDP run (gloo) of the sft recipe, served afterwards; the FSDP and
ZeRO-3 files read by accelerate's own loader and turned into the environment its launcher gives
each process; the sharded-save path run in one process. FSDP and ZeRO-3 training need CUDA
(accelerate runs them as plain DDP on CPU), so those runs are marked ``gpu`` and skipped here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from training_helpers import FAST, run_recipe

from steerserve.training import runner, saving
from steerserve.training.config import PROJECT_ROOT
from steerserve.training.manifest import is_complete, read_manifest

CONFIGS = PROJECT_ROOT / "training" / "accelerate"
RECIPE = PROJECT_ROOT / "training" / "recipes" / "sft-tiny.yaml"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP / ZeRO-3 shard only on CUDA devices")


def launch_env(name: str, num_processes: int = 2) -> tuple[object, dict[str, str]]:
    """(parsed launch args, environment) that ``accelerate launch --config_file NAME.yaml`` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(CONFIGS / f"{name}.yaml"), "--num_processes", str(num_processes),
            "-m", "steerserve.cli", "train", "sft"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")])
def test_configs_load_with_accelerates_loader(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    assert config.mixed_precision == "bf16" and not config.use_cpu and config.num_machines == 1


def test_launch_environment_per_config() -> None:
    args, env = launch_env("ddp")
    assert args.multi_gpu and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    args, env = launch_env("fsdp")
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # saving.save_sharded relies on one gathered file
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    args, env = launch_env("deepspeed_zero3")
    assert args.use_deepspeed and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env  # left "auto": the recipe decides


def test_zero3_takes_batch_and_accumulation_from_the_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed); transformers needs it to fill the config")
    from accelerate.utils import DeepSpeedPlugin
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from steerserve.training.output import RunDir
    from steerserve.training.sft import SFTRecipeConfig

    for key, value in launch_env("deepspeed_zero3")[1].items():
        if key.startswith("ACCELERATE_DEEPSPEED") or key == "ACCELERATE_USE_DEEPSPEED":
            monkeypatch.setenv(key, value)
    recipe = SFTRecipeConfig(data="x.jsonl", data_format="mcq", batch_size=2, gradient_accumulation_steps=3)
    args = TrainingArguments(**runner.trainer_arguments(recipe, RunDir(tmp_path / "out", {})))
    config = HfTrainerDeepSpeedConfig(DeepSpeedPlugin().deepspeed_config)
    config.trainer_config_process(args)
    assert config.is_zero3() and config.config["gradient_accumulation_steps"] == 3
    assert config.config["train_micro_batch_size_per_gpu"] == 2
    assert config.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def free_port() -> int:
    """A port for torchrun's rendezvous (accelerate launch takes a number, not a bound socket)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_train(config: str, output: Path, settings: list[str], num_processes: int = 2,
                     cpu: bool = True) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG -m steerserve.cli train sft ...`` as a person types it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
               "--num_processes", str(num_processes), "--main_process_port", str(free_port()),
               *(["--mixed_precision", "no"] if cpu else []),
               "-m", "steerserve.cli", "train", "sft", "--config", str(RECIPE), "--output", str(output),
               *[arg for setting in settings for arg in ("--set", setting)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=500, cwd=output.parent)


def changed_from(base: Path, trained: Path) -> bool:
    from safetensors.torch import load_file

    before, after = load_file(base / "model.safetensors"), load_file(trained / "model.safetensors")
    assert set(before) == set(after), "the output is a whole model with the base's tensor names"
    return any(not torch.equal(before[k].float(), after[k].float()) for k in before)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_one_servable_output(tmp_path: Path, tiny_model_dir: Path,
                                                             mcq_file: Path) -> None:
    out = tmp_path / "sft-ddp"
    settings = [f"model={tiny_model_dir}", f"data={mcq_file}", "data_format=mcq", *FAST, "max_steps=4"]
    done = accelerate_train("ddp", out, settings)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = read_manifest(out)
    assert not is_complete(manifest) and manifest["servable"] and manifest["steps"] == 4
    assert not manifest["resumed"], "rank 1 must not mistake rank 0's fresh work dir for a resume"
    assert not list(tmp_path.glob(".sft-ddp*")), "the work dir was committed once, nothing left behind"
    # 9 training rows, 2 per process per step: each process sees 3 batches a epoch (one process alone: 5).
    assert manifest["metrics"]["epoch"] == pytest.approx(4 / 3, abs=0.01)
    steps = [json.loads(line)["step"] for line in (out / runner.LOG_FILE).read_text().splitlines()]
    assert steps.count(1) == 1, "rank 0 alone writes the train log (each rank would log step 1)"
    assert changed_from(tiny_model_dir, out)

    live_server = pytest.importorskip("live_server")
    with live_server.serve_models({"ddp": out}, "transformers") as live:
        body = {"model": "ddp:bf16", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        reply = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text


def test_sharded_save_gathers_then_merges_lora_on_rank_0(tmp_path: Path, tiny_model_dir: Path, mcq_file: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``save_sharded`` in one process (trainer.save_model, then the LoRA merge) equals ``save_model``."""
    from safetensors.torch import load_file

    settings = [f"model={tiny_model_dir}", f"data={mcq_file}", "data_format=mcq", *FAST, "lora=true"]
    plain = run_recipe("sft", tmp_path / "plain", settings)
    # The branch save_model takes when trainer.is_fsdp_enabled / is_deepspeed_enabled (GPU-only states).
    monkeypatch.setattr(saving, "save_model", saving.save_sharded)
    sharded = run_recipe("sft", tmp_path / "sharded", settings)
    assert (sharded / "adapter" / "adapter_config.json").is_file() and read_manifest(sharded)["lora"]
    a, b = load_file(plain / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert set(a) == set(b) and not any("lora" in key for key in b)
    for key in a:
        torch.testing.assert_close(b[key], a[key])


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("config", ["fsdp", "deepspeed_zero3"])
def test_sharded_training_on_gpus_writes_one_servable_output(config: str, tmp_path: Path, tiny_model_dir: Path,
                                                             mcq_file: Path) -> None:
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed)")
    out = tmp_path / f"sft-{config}"
    settings = [f"model={tiny_model_dir}", f"data={mcq_file}", "data_format=mcq", *FAST]
    done = accelerate_train(config, out, settings, num_processes=min(2, torch.cuda.device_count()), cpu=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert read_manifest(out)["servable"] and changed_from(tiny_model_dir, out)
