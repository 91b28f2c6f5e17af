"""Attribute-conditioned SFT (SteerLM): each target reply is preceded by its attribute line.

The prompt is the shared renderer's output for the row's labels (rounded to
levels; unlabelled attributes take the codec's defaults): in ``steerlm`` format
the ``<extra_id_2>`` line opens the assistant turn, in ``chat-template`` format
it ends the system turn. The loss covers the reply only, so the model learns to
answer *as the line says*; the server renders the same line from a request's
sliders::

    steerserve train acsft --config training/recipes/acsft-tiny.yaml --output runs/acsft-tiny
    steerserve train acsft ... --set data=runs/annotate-tiny/annotations.jsonl --set data_format=helpsteer
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerserve.prompts import SteeringMethod
from steerserve.training import runner
from steerserve.training.config import BaseConfig, LoraFields, option
from steerserve.training.data.attribute_rows import FORMATS, levels, load_attribute_rows
from steerserve.training.sft import chat_example, finish, fit_prompt_completion

logger = logging.getLogger(__name__)

RECIPE = "acsft"
CONDITIONED = ("auto", SteeringMethod.STEERLM.value, SteeringMethod.CHAT_TEMPLATE.value,
               SteeringMethod.DESCRIBED.value)


@dataclasses.dataclass
class ACSFTRecipeConfig(BaseConfig, LoraFields):
    """Attribute-conditioned SFT on attribute rows (formats: helpsteer incl. annotate's output, oasst)."""

    steering: str = option("auto", "Format trained and served: auto (chat-template with a chat template, else "
                                   "steerlm), steerlm, chat-template or described.")
    learning_rate: float = option(2e-4, "Peak learning rate (linear decay).")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_lora()
        self.check_choice("data_format", FORMATS)
        self.check_extra_formats(FORMATS)
        self.check_choice("steering", CONDITIONED)


def conditioned_example(row: dict[str, Any], method: SteeringMethod, tokenizer: Any) -> dict[str, str]:
    """The reply as the completion of a prompt that carries the row's attribute line."""
    chat_row = {"prompt": [{"role": "user", "content": row["prompt"]}], "response": row["response"]}
    return chat_example(chat_row, method, tokenizer, attributes=levels(row))


def run(config: ACSFTRecipeConfig, output: Path, force: bool = False, callbacks: Sequence[Any] = ()) -> Path:
    """Train, evaluate on the held-out rows, save; returns the output directory."""
    run_dir, base, base_name = runner.start(RECIPE, config, output, force)
    tokenizer = runner.load_tokenizer(base)
    method = runner.steering_for(tokenizer, config.steering, conditioned=True)
    train_rows, test_rows, data = runner.load_and_split(
        config, lambda source, data_format: load_attribute_rows(source, data_format, config.data_split))
    train, test, dropped = runner.examples(train_rows, test_rows, lambda row: conditioned_example(
        row, method, tokenizer), tokenizer, config.max_length)
    trainer, metrics = fit_prompt_completion(config, run_dir, base, tokenizer, train, test, callbacks)
    split = {"train_rows": len(train), "test_rows": len(test), "dropped_overlong": dropped}
    return finish(RECIPE, config, run_dir, trainer, tokenizer, base_name, method, metrics, data, split=split)


CONFIG = ACSFTRecipeConfig
