"""Attribute prediction model (APM): the base LM with a regression head, one output per attribute.

The head reads the last token's hidden state of the conversation in NeMo-Aligner's
SteerLM regression-model layout (the shared turn markers, ending where the
``<extra_id_2>`` attribute line would start). Unlabelled attributes are masked
out of the MSE. Reports per-attribute MAE and Pearson r on held-out rows, and
how each attribute correlates with helpfulness (the HelpSteer paper finds
coherence and correctness at >= 0.6)::

    steerserve train apm --config training/recipes/apm-tiny.yaml --output runs/apm-tiny
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerserve.attributes import ATTRIBUTE_NAMES
from steerserve.prompts import ATTRIBUTE_TURN, SYSTEM_TURN, TURN
from steerserve.training import runner
from steerserve.training.config import BaseConfig, ConfigError, option
from steerserve.training.data.attribute_rows import FORMATS, labelled, load_attribute_rows
from steerserve.training.manifest import build_manifest
from steerserve.training.output import RunDir

logger = logging.getLogger(__name__)

RECIPE = "apm"
PAPER_PAIRS = ("coherence", "correctness")  # HelpSteer: each correlates >= 0.6 with helpfulness


@dataclasses.dataclass
class APMRecipeConfig(BaseConfig):
    """Attribute regression on attribute rows (formats: helpsteer, oasst)."""

    attributes: list[str] = option([], "Attributes to predict, in output order; empty: every attribute the "
                                       "training rows label.")
    learning_rate: float = option(1e-4, "Peak learning rate (linear decay).")
    trainable_layers: int | None = option(None, "Train only the head, the final norm and the last N decoder "
                                                "layers (backward stops there: much cheaper on CPU); "
                                                "null: every weight.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("data_format", FORMATS)
        self.check_extra_formats(FORMATS)
        if self.trainable_layers is not None:
            self.check_positive("trainable_layers")
        unknown = [name for name in self.attributes if name not in ATTRIBUTE_NAMES]
        if unknown:
            raise ConfigError(f"attributes: unknown {unknown}; known: {', '.join(ATTRIBUTE_NAMES)}")


def apm_text(prompt: str, response: str) -> str:
    """The conversation the APM scores, ending where the SteerLM attribute line goes."""
    return f"{SYSTEM_TURN}System\n\n{TURN}User\n{prompt}\n{TURN}Assistant\n{response}\n{ATTRIBUTE_TURN}"


def load_apm(path: str, attributes: Sequence[str] | None = None) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, attribute names): a trained APM dir, or a base LM given a fresh head for ``attributes``."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tokenizer = runner.load_tokenizer(path)
    tokenizer.truncation_side = "left"  # keep the end: the last token is what the head reads
    if attributes is None:
        names = list(AutoConfig.from_pretrained(path).id2label.values())
    else:
        names = list(attributes)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(names), problem_type="regression", dtype=torch.float32,
        id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)},
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, names


def encode(rows: list[dict[str, Any]], tokenizer: Any, names: list[str], max_length: int) -> list[dict[str, Any]]:
    """Token ids and the label vector (NaN where unlabelled) per row."""
    encoded = []
    for row in rows:
        ids = tokenizer(apm_text(row["prompt"], row["response"]), truncation=True, max_length=max_length).input_ids
        labels = [math.nan if row.get(name) is None else float(row[name]) for name in names]
        encoded.append({"input_ids": ids, "labels": labels})
    return encoded


def collate(pad_id: int) -> Any:
    """Right-pads a batch; labels stay float with NaN masks."""
    import torch

    def collate_batch(batch: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(item["input_ids"]) for item in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, item in enumerate(batch):
            ids[i, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[i, : len(item["input_ids"])] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "labels" in batch[0]:
            out["labels"] = torch.tensor([item["labels"] for item in batch], dtype=torch.float32)
        return out

    return collate_batch


def masked_mse(predictions: Any, labels: Any) -> Any:
    """Mean squared error over the labelled entries only (a missing label is not a 0)."""
    present = ~labels.isnan()
    errors = (predictions.float() - labels.nan_to_num()) ** 2 * present
    return errors.sum() / present.sum().clamp(min=1)


def masked_trainer_class() -> type:
    from transformers import Trainer

    class MaskedMSETrainer(Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = masked_mse(outputs.logits, labels)
            return (loss, outputs) if return_outputs else loss

    return MaskedMSETrainer


def predict(model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int, max_length: int,
            names: list[str], progress: bool = True) -> list[list[float]]:
    """Raw predictions, one list of len(names) per row, in batches with a progress bar."""
    import torch
    from tqdm.auto import tqdm

    batches = range(0, len(rows), batch_size)
    to_batch = collate(tokenizer.pad_token_id)
    outputs: list[list[float]] = []
    model.eval()
    with torch.no_grad():
        for start in tqdm(batches, desc="APM predict", disable=not progress, leave=False):
            encoded = encode(rows[start:start + batch_size], tokenizer, names, max_length)
            chunk = [{"input_ids": item["input_ids"]} for item in encoded]
            batch = {k: v.to(model.device) for k, v in to_batch(chunk).items()}
            outputs.extend(model(**batch).logits.float().tolist())
    return outputs


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson r, or None with fewer than 3 points or a constant side."""
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def attribute_metrics(rows: list[dict[str, Any]], predictions: list[list[float]], names: list[str]) -> dict[str, Any]:
    """Per attribute: MAE and Pearson r between prediction and label, over the rows that label it."""
    metrics: dict[str, Any] = {}
    for j, name in enumerate(names):
        pairs = [(p[j], row[name]) for row, p in zip(rows, predictions) if row.get(name) is not None]
        if not pairs:
            continue
        predicted, gold = [p for p, _ in pairs], [g for _, g in pairs]
        metrics[name] = {"n": len(pairs), "mae": sum(abs(p - g) for p, g in pairs) / len(pairs),
                         "pearson_r": pearson(predicted, gold)}
    return metrics


def helpfulness_correlations(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, float | None]:
    """Pearson r of each attribute's labels with helpfulness (the HelpSteer paper's table)."""
    found = {}
    for name in names:
        if name == "helpfulness":
            continue
        both = [(row["helpfulness"], row[name]) for row in rows
                if row.get("helpfulness") is not None and row.get(name) is not None]
        found[name] = pearson([h for h, _ in both], [v for _, v in both])
    return found


def evaluate(model: Any, tokenizer: Any, rows: list[dict[str, Any]], all_rows: list[dict[str, Any]],
             names: list[str], config: APMRecipeConfig) -> dict[str, Any]:
    """Held-out MAE / r per attribute, plus label correlations with helpfulness against the paper's >= 0.6."""
    predictions = predict(model, tokenizer, rows, config.eval_batch_size, config.max_length, names)
    metrics: dict[str, Any] = {"heldout": attribute_metrics(rows, predictions, names)}
    if "helpfulness" in names:
        labels_r = helpfulness_correlations(all_rows, ATTRIBUTE_NAMES)
        predicted_rows = [dict(zip(names, p)) for p in predictions]
        metrics["label_r_with_helpfulness"] = labels_r
        metrics["predicted_r_with_helpfulness"] = helpfulness_correlations(predicted_rows, names)
        metrics["helpsteer_paper_check"] = {
            name: {"label_r": labels_r.get(name), "paper": ">= 0.6"} for name in PAPER_PAIRS
        }
    return metrics


def freeze_below(model: Any, trainable_layers: int) -> int:
    """Freeze embeddings and all but the last ``trainable_layers`` decoder layers; returns trainable weights.

    Nothing below the lowest trainable layer needs a gradient, so autograd stops there.
    """
    layers = model.base_model.layers
    if trainable_layers > len(layers):
        raise ValueError(f"trainable_layers: the model has {len(layers)} layers, asked for {trainable_layers}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in [*layers[-trainable_layers:], model.base_model.norm, model.score]:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_apm(config: APMRecipeConfig, run_dir: RunDir, base: str, train_rows: list[dict], names: list[str],
              callbacks: Sequence[Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Fit the regression head and the LM on the masked MSE; returns (trainer, tokenizer, train metrics)."""
    from datasets import Dataset
    from transformers import TrainingArguments

    model, tokenizer, names = load_apm(base, names)
    if config.trainable_layers:
        logger.info("training %d weights (last %d layers + head)", freeze_below(model, config.trainable_layers),
                    config.trainable_layers)
    args = TrainingArguments(**runner.trainer_arguments(config, run_dir), remove_unused_columns=False)
    trainer = masked_trainer_class()(
        model=model, args=args, data_collator=collate(tokenizer.pad_token_id), processing_class=tokenizer,
        train_dataset=Dataset.from_list(encode(train_rows, tokenizer, names, config.max_length)),
        callbacks=[runner.json_log_callback(run_dir.work / runner.LOG_FILE), *callbacks],
    )
    return trainer, tokenizer, runner.train(trainer, run_dir)


def run(config: APMRecipeConfig, output: Path, force: bool = False, callbacks: Sequence[Any] = ()) -> Path:
    """Train the APM, evaluate it on the held-out rows, save it (not servable as a chat model)."""
    run_dir, base, base_name = runner.start(RECIPE, config, output, force)
    work = run_dir.work
    train_rows, test_rows, data = runner.load_and_split(
        config, lambda source, data_format: load_attribute_rows(source, data_format, config.data_split))
    names = config.attributes or [n for n in ATTRIBUTE_NAMES if any(r[n] is not None for r in train_rows)]
    trainer, tokenizer, metrics = train_apm(config, run_dir, base, train_rows, names, callbacks)
    if test_rows:
        metrics.update(evaluate(trainer.model, tokenizer, test_rows, train_rows + test_rows, names, config))
    trainer.save_model(str(work))
    runner.drop_base(work)
    labelled_counts = {name: sum(1 for r in train_rows if name in labelled(r)) for name in names}
    manifest = build_manifest(
        RECIPE, config, base_model=base_name, data=data,
        metrics=metrics, steps=trainer.state.global_step, steering=None, servable=False,
        attributes=names, labelled_train_rows=labelled_counts, resumed=run_dir.resumed,
        split={"train_rows": len(train_rows), "test_rows": len(test_rows)},
    )
    return run_dir.commit(manifest, config.keep_checkpoints)


CONFIG = APMRecipeConfig
