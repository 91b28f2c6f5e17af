"""Direct preference optimisation with TRL's DPOTrainer: sigmoid, robust or IPO loss.

``label_smoothing`` is the assumed rate of flipped preference labels for the
robust loss. Reports reward accuracy and margin on the held-out split (grouped
by prompt)::

    steerserve train dpo --config training/recipes/dpo-tiny.yaml --output runs/dpo-tiny --set loss_type=robust
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerserve.prompts import SteeringMethod
from steerserve.training import runner
from steerserve.training.config import BaseConfig, ConfigError, LoraFields, option
from steerserve.training.data.preferences import FORMATS, load_preference_pairs
from steerserve.training.mirrored_batches import mirrored_trainer_class
from steerserve.training.output import RunDir

logger = logging.getLogger(__name__)

RECIPE = "dpo"
LOSS_TYPES = ("sigmoid", "robust", "ipo")
HELD_OUT = {"eval_rewards/accuracies": "heldout_reward_accuracy", "eval_rewards/margins": "heldout_reward_margin",
            "eval_loss": "heldout_loss"}


@dataclasses.dataclass
class DPORecipeConfig(BaseConfig, LoraFields):
    """DPO on preference pairs (formats: hh-rlhf, pairs, helpsteer, oasst, oasst-ranks; helpsteer-sliders for
    attribute-conditioned pairs, trained with a conditioned steering format such as described)."""

    loss_type: str = option("sigmoid", "DPO loss: sigmoid (DPO), robust (rDPO, uses label_smoothing) or ipo.")
    beta: float = option(0.1, "Strength of the pull towards the reference model (higher: stay closer).")
    label_smoothing: float = option(0.0, "robust: assumed share of flipped preference labels, in [0, 0.5).")
    learning_rate: float = option(1e-6, "Peak learning rate (linear decay).")
    steering: str = option("auto", "Prompt format trained and served: auto (instructions with a chat template, "
                                   "else steerlm), steerlm, chat-template, instructions or described.")
    sft_weight: float = option(0.0, "Weight of a negative log-likelihood term on the chosen reply, end of turn "
                                    "included, added to the DPO loss (RPO; TRL's 'sft' loss). One epoch of plain DPO "
                                    "on the default model learned answers that never end; this keeps ending likely.")
    ld_alpha: float = option(1.0, "LD-DPO: weight of the reply tokens past the shorter reply's length, in [0, 1] "
                                  "(1: plain DPO; 0: only the shared length counts), so that 'longer wins' is not "
                                  "what the pairs teach.")
    whole_replies: bool = option(False, "Train only on pairs whose prompt and both replies, end of turn included, "
                                        "fit max_length (the held-out pairs stay as they are): TRL cuts a reply's "
                                        "end, and a pair whose chosen reply alone is cut rewards not ending.")
    mirrored_batches: bool = option(False, "Keep the two mirrored pairs of a helpsteer-sliders contrast in one "
                                           "batch (batch_size must be even), so only the attribute line tells "
                                           "them apart.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_lora()
        self.check_choice("data_format", FORMATS)
        self.check_extra_formats(FORMATS)
        self.check_choice("loss_type", LOSS_TYPES)
        self.check_choice("steering", runner.STEERING_CHOICES)
        if self.beta <= 0:
            raise ConfigError(f"beta: must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "robust":
            raise ConfigError(f"label_smoothing: only the robust loss uses it (loss_type is {self.loss_type!r})")
        if self.sft_weight < 0:
            raise ConfigError(f"sft_weight: must be 0 (off) or positive, got {self.sft_weight}")
        if not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"ld_alpha: must be in [0, 1] (1 = plain DPO), got {self.ld_alpha}")
        if self.mirrored_batches and self.batch_size % 2:
            raise ConfigError(f"batch_size: mirrored_batches needs an even batch size, got {self.batch_size}")


def pair_example(pair: dict[str, Any], method: SteeringMethod, tokenizer: Any) -> dict[str, str]:
    """Prompt as the server renders it (with the pair's attribute levels, for attribute-conditioned pairs);
    both replies end with the model's end of turn."""
    end = runner.end_of_turn(method, tokenizer)
    return {
        "prompt": runner.chat_prompt(pair["prompt"], pair.get("attributes"), method, tokenizer),
        "chosen": pair["chosen"] + end,
        "rejected": pair["rejected"] + end,
    }


def whole_pairs(examples: list[dict[str, str]], tokenizer: Any, max_length: int) -> tuple[list[dict[str, str]], int]:
    """(kept, dropped): the examples whose prompt + chosen and prompt + rejected both fit ``max_length`` tokens,
    counted as the trainer tokenizes them (prompt and reply as one text)."""
    kept = [ex for ex in examples
            if all(len(tokenizer(ex["prompt"] + ex[side]).input_ids) <= max_length for side in ("chosen", "rejected"))]
    if not kept:
        raise ConfigError(f"max_length: whole_replies leaves no training pair of {len(examples)} "
                          f"(every pair has a reply cut at {max_length} tokens)")
    return kept, len(examples) - len(kept)


def build_trainer(config: DPORecipeConfig, run_dir: RunDir, base: str, tokenizer: Any,
                  train: list[dict[str, str]], test: list[dict[str, str]], callbacks: Sequence[Any] = ()) -> Any:
    """A DPOTrainer whose reference model is the base (or the adapter-free base with LoRA)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        **runner.trainer_arguments(config, run_dir),
        loss_type=[config.loss_type, "sft"] if config.sft_weight else [config.loss_type],  # a list in TRL 1.x
        loss_weights=[1.0, config.sft_weight] if config.sft_weight else None,
        ld_alpha=None if config.ld_alpha == 1.0 else config.ld_alpha,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        max_length=config.max_length,
    )
    trainer_class = mirrored_trainer_class(DPOTrainer) if config.mirrored_batches else DPOTrainer
    return trainer_class(args=args, **runner.trl_trainer_kwargs(config, run_dir, base, tokenizer, train, test,
                                                                callbacks))


def held_out_metrics(trainer: Any) -> dict[str, Any]:
    """Reward accuracy/margin and loss on the held-out pairs, under readable names."""
    metrics = trainer.evaluate()
    return {HELD_OUT.get(key, key): value for key, value in metrics.items()}


def run(config: DPORecipeConfig, output: Path, force: bool = False, callbacks: Sequence[Any] = ()) -> Path:
    """Train, evaluate on the held-out pairs, save; returns the output directory."""
    from steerserve.training.sft import finish

    run_dir, base, base_name = runner.start(RECIPE, config, output, force)
    tokenizer = runner.load_tokenizer(base)
    method = runner.steering_for(tokenizer, config.steering, conditioned=config.data_format == "helpsteer-sliders")
    train_pairs, test_pairs, data = runner.load_and_split(
        config, lambda source, data_format: load_preference_pairs(source, data_format, config.data_split))
    train, test, dropped = runner.examples(train_pairs, test_pairs, lambda pair: pair_example(
        pair, method, tokenizer), tokenizer, config.max_length)
    split = {"train_pairs": len(train), "test_pairs": len(test), "dropped_overlong": dropped}
    if config.whole_replies:
        train, split["dropped_cut_replies"] = whole_pairs(train, tokenizer, config.max_length)
        split["train_pairs"] = len(train)
        logger.info("whole_replies: dropped %d train pairs with a reply cut at max_length=%d",
                    split["dropped_cut_replies"], config.max_length)
    trainer = build_trainer(config, run_dir, base, tokenizer, train, test, callbacks)
    metrics = runner.train(trainer, run_dir)
    if test:
        metrics.update(held_out_metrics(trainer))
    return finish(RECIPE, config, run_dir, trainer, tokenizer, base_name, method, metrics, data, split=split)


CONFIG = DPORecipeConfig
