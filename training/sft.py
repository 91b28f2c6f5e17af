"""Supervised fine-tuning on chat rows or MCQ rows, with TRL's SFTTrainer (LoRA optional).

Prompts come from the shared renderer exactly as the server builds them; the
loss covers only the completion (the reply, or ``"Answer: B"`` + optional
rationale for MCQ) and its end of turn::

    steerserve train sft --config training/recipes/sft-tiny.yaml --output runs/sft-tiny
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerserve.prompts import SteeringMethod, render_mcq_answer, render_mcq_question
from steerserve.training import runner, saving
from steerserve.training.config import BaseConfig, LoraFields, option
from steerserve.training.data.chat import FORMATS as CHAT_FORMATS
from steerserve.training.data.chat import load_chat_rows
from steerserve.training.data.io import LoadReport
from steerserve.training.data.mcq import FORMATS as MCQ_FORMATS
from steerserve.training.data.mcq import load_mcq_rows
from steerserve.training.manifest import build_manifest
from steerserve.training.output import RunDir

logger = logging.getLogger(__name__)

RECIPE = "sft"
Example = dict[str, str]


@dataclasses.dataclass
class SFTRecipeConfig(BaseConfig, LoraFields):
    """SFT on chat rows (formats: messages, hh-rlhf, pairs, helpsteer, oasst) or MCQ rows
    (sciq, aqua, mmlu, truthfulqa, mcq)."""

    steering: str = option("auto", "Prompt format trained and served: auto (instructions with a chat template, "
                                   "else steerlm), steerlm, chat-template, instructions or described.")
    mcq_explanations: bool = option(True, "MCQ targets include the rationale after the answer letter when the "
                                          "row has one.")
    learning_rate: float = option(2e-4, "Peak learning rate (linear decay).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_lora()
        self.check_choice("data_format", (*CHAT_FORMATS, *MCQ_FORMATS))
        self.check_extra_formats(MCQ_FORMATS if self.is_mcq else CHAT_FORMATS)  # MCQ or chat rows, not both
        self.check_choice("steering", runner.STEERING_CHOICES)

    @property
    def is_mcq(self) -> bool:
        return self.data_format in MCQ_FORMATS


def chat_example(row: dict[str, Any], method: SteeringMethod, tokenizer: Any,
                 attributes: dict[str, Any] | None = None) -> Example:
    """Prompt as the server renders it; completion = reply + end of turn."""
    prompt = runner.chat_prompt(row["prompt"], attributes, method, tokenizer)
    return {"prompt": prompt, "completion": row["response"] + runner.end_of_turn(method, tokenizer)}


def mcq_example(row: dict[str, Any], method: SteeringMethod, tokenizer: Any, explanations: bool = True) -> Example:
    """User turn = the shared MCQ question; completion = ``render_mcq_answer`` (``"Answer: B..."``) + end of turn.

    The server's MCQ prompt is this prompt + ``"Answer:"``, so the trained answer token is the one it scores.
    """
    question = render_mcq_question(row["question"], row["choices"], row.get("context"))
    prompt = runner.chat_prompt([{"role": "user", "content": question}], None, method, tokenizer)
    answer = render_mcq_answer(row["answer"], row.get("explanation") if explanations else None)
    return {"prompt": prompt, "completion": answer + runner.end_of_turn(method, tokenizer)}


def fit_prompt_completion(
    config: SFTRecipeConfig, run_dir: RunDir, base: str, tokenizer: Any,
    train_examples: list[Example], test_examples: list[Example], callbacks: Sequence[Any] = (),
) -> tuple[Any, dict[str, Any]]:
    """SFTTrainer on prompt/completion examples; returns (trainer, metrics)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**runner.trainer_arguments(config, run_dir), max_length=config.max_length,
                     completion_only_loss=True)
    kwargs = runner.trl_trainer_kwargs(config, run_dir, base, tokenizer, train_examples, test_examples, callbacks)
    trainer = SFTTrainer(args=args, **kwargs)
    metrics = runner.train(trainer, run_dir)
    if test_examples:
        metrics.update(trainer.evaluate())
    return trainer, metrics


def finish(recipe: str, config: SFTRecipeConfig, run_dir: RunDir, trainer: Any, tokenizer: Any,
           base_name: str, method: SteeringMethod, metrics: dict[str, Any], data: list[dict[str, Any]],
           **extra: Any) -> Path:
    """Save the servable checkpoint (merged if LoRA) and the manifest, then commit the output dir."""
    saving.save_model(trainer, tokenizer, run_dir.work, getattr(config, "lora_base_precision", None))
    runner.drop_base(run_dir.work)
    manifest = build_manifest(
        recipe, config, base_model=base_name, data=data, metrics=runner.finite_metrics(metrics),
        steps=trainer.state.global_step, steering=method.value, servable=True,
        resumed=run_dir.resumed, lora=config.lora, **extra,
    )
    return run_dir.commit(manifest, config.keep_checkpoints)


def run(config: SFTRecipeConfig, output: Path, force: bool = False, callbacks: Sequence[Any] = ()) -> Path:
    """Train, evaluate on the held-out split, save; returns the output directory."""
    run_dir, base, base_name = runner.start(RECIPE, config, output, force)
    tokenizer = runner.load_tokenizer(base)
    method = runner.steering_for(tokenizer, config.steering)
    def load(data: str, data_format: str) -> tuple[list[dict[str, Any]], LoadReport]:
        if config.is_mcq:
            return load_mcq_rows(data, data_format, config.data_split, config.seed)
        return load_chat_rows(data, data_format, config.data_split)

    train_rows, test_rows, data = runner.load_and_split(config, load)
    if config.is_mcq:
        build = lambda row: mcq_example(row, method, tokenizer, config.mcq_explanations)  # noqa: E731
    else:
        build = lambda row: chat_example(row, method, tokenizer)  # noqa: E731
    train, test, dropped = runner.examples(train_rows, test_rows, build, tokenizer, config.max_length)
    trainer, metrics = fit_prompt_completion(config, run_dir, base, tokenizer, train, test, callbacks)
    if config.is_mcq and test_rows:
        from steerserve.training.evaluate import mcq_accuracy

        metrics.update(mcq_accuracy(trainer.model, tokenizer, test_rows, method))
    split = {"train_rows": len(train), "test_rows": len(test), "dropped_overlong": dropped}
    return finish(RECIPE, config, run_dir, trainer, tokenizer, base_name, method, metrics, data, split=split)


CONFIG = SFTRecipeConfig
