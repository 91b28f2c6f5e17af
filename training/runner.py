"""What the Trainer-based recipes share: base model, prompts, trainer arguments, resume, saving.

Imports torch/transformers only inside functions, so the CLI's ``--help`` stays instant::

    base, name = materialize_base(config.model, run_dir.work)
    tokenizer = load_tokenizer(base)
    prompt = chat_prompt(messages, None, steering_for(tokenizer, "auto"), tokenizer)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerserve.prompts import STEERLM_STOP, SteeringMethod, render_chat
from steerserve.training import distributed
from steerserve.training.config import TINY_MODELS, BaseConfig, CommonConfig, ConfigError, LoraFields
from steerserve.training.data.split import grouped_split, prompt_key
from steerserve.training.output import RunDir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

logger = logging.getLogger(__name__)

BASE_DIR = "base-model"
LOG_FILE = "logs/train_log.jsonl"
STEERING_CHOICES = ("auto", *(method.value for method in SteeringMethod))


# ---- base model and tokenizer ----------------------------------------------


def start(recipe: str, config: CommonConfig, output: Path, force: bool) -> tuple[RunDir, str, str]:
    """(run dir, base path, base name): the output checked and prepared, the base model at hand.

    Under ``accelerate launch`` rank 0 goes first (checks the output, builds a tiny base or
    converts the default model); the other ranks then find both ready instead of racing it.
    """
    run_dir = RunDir(output, {"recipe": recipe, "config": config.to_dict()}, force)
    with distributed.main_process_first():
        base, base_name = materialize_base(config.model, run_dir.prepare())
    return run_dir, base, base_name



def materialize_base(model: str, work: Path) -> tuple[str, str]:
    """(path to load, name for the manifest); ``tiny``/``tiny-raw`` are built into the work dir once.

    ``default`` is the server's default model, in the same cache (``STEERSERVE_CACHE_DIR``); ``default:nf4`` that
    model as ``steerserve quantize`` makes it nf4, the base the server serves a QLoRA adapter of it on.
    """
    from steerserve.default_model import CACHE_DIR, DEFAULT_MODEL_NAME, default_precision, resolve_default

    if (precision := default_precision(model)) is not None:
        cache = Path(os.environ.get("STEERSERVE_CACHE_DIR", CACHE_DIR))
        name = DEFAULT_MODEL_NAME if precision == "bf16" else f"{DEFAULT_MODEL_NAME}:{precision}"
        return str(resolve_default(model, cache)), name
    if model not in TINY_MODELS:
        return model, model
    from steerserve.training.tiny import build_tiny_model

    path = work / BASE_DIR
    if not (path / "config.json").exists():  # a resumed run reuses the same build
        build_tiny_model(path, chat_template=model == "tiny")
    return str(path), f"{model} (random Llama built by steerserve.training.tiny)"


def drop_base(work: Path) -> None:
    """Remove a built tiny base before the work dir becomes the output (rank 0 alone under a launcher)."""
    if distributed.is_main_process():
        shutil.rmtree(work / BASE_DIR, ignore_errors=True)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The base's tokenizer, with a pad token (batches need one; eos stands in when absent)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, precision: str | None = None) -> Any:
    """The base LM in float32 (CPU training; mixed precision is the trainer's ``bf16``).

    With ``precision`` (QLoRA's ``lora_base_precision``) its linear layers are quantized at load exactly as
    the transformers engine loads that variant (same ``BitsAndBytesConfig``), computing in float32; a
    checkpoint saved already quantized is loaded as stored.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if precision is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from steerserve.precision import Precision
    from steerserve.server.engines.base import EngineConfig
    from steerserve.server.engines.hf_engine import load_model

    # The engine's own loading: a checkpoint saved already nf4 (e.g. GPTQ-rounded) keeps its codes, and the 4-bit
    # layers compute in float32. Eval mode there; the trainer switches to train mode itself.
    return load_model(path, EngineConfig(model=path, precision=Precision(precision)), compute_dtype="float32")


# ---- prompts: the serving renderer, so serving sees the training text --------


def steering_for(tokenizer: PreTrainedTokenizerBase, requested: str, conditioned: bool = False) -> SteeringMethod:
    """The method a run trains (and the server will use).

    ``auto``: models with a chat template get ``chat-template`` when the run teaches
    attribute lines (acsft), else ``instructions``; models without one get ``steerlm``.
    """
    if requested != "auto":
        method = SteeringMethod(requested)
    elif not tokenizer.chat_template:
        method = SteeringMethod.STEERLM
    else:
        method = SteeringMethod.CHAT_TEMPLATE if conditioned else SteeringMethod.INSTRUCTIONS
    if method is not SteeringMethod.STEERLM and not tokenizer.chat_template:
        raise ValueError(f"steering {method.value!r} needs a tokenizer with a chat template")
    return method


def chat_prompt(messages: Sequence[dict[str, str]], attributes: dict[str, Any] | None, method: SteeringMethod,
                tokenizer: PreTrainedTokenizerBase, assistant_prefix: str = "") -> str:
    """Exactly what the server renders for these messages and attributes."""

    def apply_template(msgs: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    return render_chat(messages, attributes, method, apply_template, assistant_prefix)


def end_of_turn(method: SteeringMethod, tokenizer: PreTrainedTokenizerBase) -> str:
    """What ends an assistant turn: SteerLM's ``\\n<extra_id_1>`` (the server's stop string) or the eos."""
    return f"\n{STEERLM_STOP}" if method is SteeringMethod.STEERLM else tokenizer.eos_token


# ---- data --------------------------------------------------------------------


def load_and_split(config: BaseConfig, load: Callable[[str, str], tuple[list[dict], Any]],
                   ) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, data entries) over ``data`` (cut to ``limit``) and every ``extra_data`` source.

    Each source is split on its own with :func:`grouped_split`, so e.g. MMLU's held-out questions are
    the same whatever else a run mixes in (benchmarks re-derive them with the same call).
    """
    from steerserve.training.config import parse_source
    from steerserve.training.manifest import data_entry

    sources = [(config.data_format, config.data, config.limit), *map(parse_source, config.extra_data)]
    train: list[dict] = []
    test: list[dict] = []
    entries = []
    for data_format, data, limit in sources:
        rows, report = load(data, data_format)
        rows = rows[:limit] if limit else rows
        source_train, source_test = grouped_split(rows, prompt_key, config.test_fraction, config.seed)
        logger.info("%s: %d train rows, %d held-out rows (grouped by prompt)", data, len(source_train),
                    len(source_test))
        train += source_train
        if config.eval_limit and len(source_test) > config.eval_limit:  # evaluation cost only: an even spread
            source_test = source_test[:: len(source_test) // config.eval_limit][: config.eval_limit]
        test += source_test
        entries.append(data_entry(data, report, data_format))
    if not train:
        raise ValueError(f"{config.data}: no training rows left after the split")
    return train, test, entries


def examples(train_rows: list[dict], test_rows: list[dict], build: Callable[[dict], dict[str, str]],
             tokenizer: PreTrainedTokenizerBase, max_length: int, room: int = 16) -> tuple[list, list, int]:
    """(train, test, dropped): built examples whose prompt leaves at least ``room`` tokens for the reply.

    The trainers truncate at the end, so an over-long prompt would leave nothing to learn from.
    """
    built = [[build(row) for row in rows] for rows in (train_rows, test_rows)]
    kept = [[ex for ex in side if len(tokenizer(ex["prompt"]).input_ids) <= max_length - room] for side in built]
    dropped = sum(map(len, built)) - sum(map(len, kept))
    if dropped:
        logger.warning("dropped %d of %d examples whose prompt leaves under %d of max_length=%d tokens",
                       dropped, sum(map(len, built)), room, max_length)
    if not kept[0]:  # the trainer would fail on an empty data set with a bare StopIteration
        raise ConfigError(f"max_length: no training example left of {len(built[0])} train rows "
                          f"({dropped} prompts leave under {room} of {max_length} tokens; check data, "
                          f"test_fraction and max_length)")
    return kept[0], kept[1], dropped


# ---- trainer -----------------------------------------------------------------


def trainer_arguments(config: BaseConfig, run_dir: RunDir) -> dict[str, Any]:
    """TrainingArguments fields every recipe sets the same way (checkpoints under the work dir)."""
    return {
        "output_dir": str(run_dir.checkpoints),
        "max_steps": config.max_steps,
        "num_train_epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.eval_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_checkpointing": config.gradient_checkpointing,
        "logging_steps": config.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 2,
        "eval_strategy": "no",
        "seed": config.seed,
        "report_to": [],
        "bf16": False,
        "use_cpu": distributed.trains_on_cpu(),
        "disable_tqdm": False,
        "dataloader_num_workers": 0,
    }


def trl_trainer_kwargs(config: BaseConfig, run_dir: RunDir, base: str, tokenizer: PreTrainedTokenizerBase,
                       train: list[dict[str, str]], test: list[dict[str, str]],
                       callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """What SFTTrainer and DPOTrainer take alike: model, data, tokenizer, LoRA, JSON log + caller callbacks."""
    from datasets import Dataset

    return {
        "model": load_causal_lm(base, getattr(config, "lora_base_precision", None)),
        "train_dataset": Dataset.from_list(train),
        "eval_dataset": Dataset.from_list(test) if test else None,
        "processing_class": tokenizer,
        "peft_config": lora_config(config, base=base),  # type: ignore[arg-type]  # the LoRA recipes' configs have its fields
        "callbacks": [json_log_callback(run_dir.work / LOG_FILE), *callbacks],
    }


def json_log_callback(path: Path) -> TrainerCallback:
    """A callback appending every trainer log (loss, lr, ...) as one JSON line to ``path``."""
    from transformers import TrainerCallback

    class JsonLog(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero:  # every rank logs; one copy of each line is enough
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")

    return JsonLog()


def lora_config(config: LoraFields, task_type: str = "CAUSAL_LM", base: str | None = None) -> Any:
    """A peft LoraConfig when the recipe asks for LoRA, else None (``lora_layers`` needs ``base``'s depth)."""
    if not config.lora:
        return None
    from peft import LoraConfig

    layers = None
    if config.lora_layers:
        depth = json.loads((Path(base or "") / "config.json").read_text())["num_hidden_layers"]
        if config.lora_layers > depth:
            raise ValueError(f"lora_layers: the model has {depth} layers, asked for {config.lora_layers}")
        layers = list(range(depth - config.lora_layers, depth))
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), task_type=task_type,
                      layers_to_transform=layers)


def adapters_in_float32(trainer: Trainer) -> None:
    """Trainable weights back to float32 where the trainer runs in float32.

    TRL casts a quantized base's LoRA weights to bfloat16 (for GPU mixed precision); on a CPU run without
    ``bf16`` that only coarsens the adapter and its optimizer state, so it trains in float32 like any LoRA.
    """
    import torch

    if trainer.args.bf16 or trainer.args.fp16:
        return
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def train(trainer: Trainer, run_dir: RunDir) -> dict[str, Any]:
    """Train, resuming from the work dir's last checkpoint; returns the train metrics.

    A run stopped after saving its final step's checkpoint (while evaluating or saving the model) is not trained
    again: the Trainer, resumed at ``max_steps``, would take one step more and report that step's loss alone.
    """
    adapters_in_float32(trainer)
    checkpoint = run_dir.last_checkpoint()
    if checkpoint and _finished_steps(checkpoint) >= trainer.args.max_steps > 0:
        logger.info("%s holds every step (max_steps %d): loading it, not training", checkpoint,
                    trainer.args.max_steps)
        return _load_finished(trainer, checkpoint, run_dir.work / LOG_FILE)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    return {"train_loss": result.training_loss, "train_runtime_s": result.metrics.get("train_runtime")}


def _finished_steps(checkpoint: str) -> int:
    """The optimizer steps a Trainer checkpoint had taken (its trainer_state.json)."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def _load_finished(trainer: Trainer, checkpoint: str, log_path: Path) -> dict[str, Any]:
    """The trained weights and state of a finished checkpoint, and the train metrics the run logged for it."""
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    trainer._load_from_checkpoint(checkpoint)  # the Trainer's own resume loading (full weights or adapters)
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.is_file() else []
    finished = [r for r in records if "train_loss" in r and r["step"] == trainer.state.global_step]
    if finished:  # the end-of-training record, logged before the interruption
        return {"train_loss": finished[-1]["train_loss"], "train_runtime_s": finished[-1].get("train_runtime")}
    losses = [r["loss"] for r in records if "loss" in r and r["step"] <= trainer.state.global_step]
    return {"train_loss": sum(losses) / len(losses) if losses else None, "train_runtime_s": None}


def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics rounded for the manifest (NaN/inf kept as strings so JSON stays valid)."""
    clean = {}
    for key, value in metrics.items():
        if isinstance(value, float):
            clean[key] = round(value, 6) if value == value and abs(value) != float("inf") else str(value)
        else:
            clean[key] = value
    return clean
