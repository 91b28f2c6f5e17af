"""Label prompt/response rows with an attribute prediction model (batched, progress bar, resumable).

Writes ``DIR/annotations.jsonl``: per row the prompt, the response, the predicted
``attributes`` (levels 0-4), the full SteerLM ``attribute_line`` made by the shared
codec (what ``acsft`` reads back) and the raw predictions. An interrupted run
continues after the last complete line when rerun with the same settings::

    steerserve train annotate --config training/recipes/annotate-tiny.yaml --output runs/annotate-tiny \\
        --set model=runs/apm-tiny
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from steerserve.attributes import ATTRIBUTE_NAMES, format_attributes
from steerserve.training import distributed, runner
from steerserve.training.apm import attribute_metrics, load_apm, predict
from steerserve.training.calibration import calibrate_annotations, reference_shares
from steerserve.training.config import DEFAULT_MODEL, TINY_MODELS, CommonConfig, ConfigError, option
from steerserve.training.data.attribute_rows import FORMATS, load_attribute_rows, to_level
from steerserve.training.manifest import build_manifest, data_entry
from steerserve.training.output import complete_lines

logger = logging.getLogger(__name__)

RECIPE = "annotate"
ANNOTATIONS = "annotations.jsonl"


@dataclasses.dataclass
class AnnotateConfig(CommonConfig):
    """Annotate prompt/response rows (formats: helpsteer, oasst; labels not needed) with an APM."""

    model: str = option("tiny", "APM directory written by `steerserve train apm`; 'tiny' / 'tiny-raw' / 'default' "
                                "put an untrained head on that base (random labels: for trying the pipeline only).")
    attributes: list[str] = option([], "With a tiny model: the attributes its fresh head predicts (empty: all nine).")
    batch_size: int = option(16, "Rows per forward pass.")
    max_length: int = option(512, "Longest tokenized conversation (the start is cut, the end kept).")
    measured: list[str] = option([], "Attributes labelled by measurement instead of the APM: verbosity (length "
                                     "quantile among the prompt's replies), complexity (Flesch-Kincaid grade).")
    complexity_scale: str = option("absolute", "Measured complexity: absolute (the grade bucketed at school stages "
                                               "4/7/10/13) or relative (the grade's quantile among the prompt's "
                                               "replies, as for verbosity: plain vs technical answers to one "
                                               "question, not easy vs hard questions).")
    calibrate: bool = option(False, "Give the APM's predictions the level shares of the labels it learned from "
                                    "(read from its manifest), keeping its ranking: a regression head pulls "
                                    "toward the mean, so plain rounding leaves levels 0 and 4 almost empty.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("data_format", FORMATS)
        self.check_choice("complexity_scale", COMPLEXITY_SCALES)
        self.check_positive("batch_size", "max_length")
        unknown = [name for name in self.attributes if name not in ATTRIBUTE_NAMES]
        if unknown:
            raise ConfigError(f"attributes: unknown {unknown}; known: {', '.join(ATTRIBUTE_NAMES)}")
        unmeasurable = [name for name in self.measured if name not in MEASURABLE]
        if unmeasurable:
            raise ConfigError(f"measured: {unmeasurable} cannot be measured; measurable: {', '.join(MEASURABLE)}")
        if self.calibrate and self.model in (*TINY_MODELS, DEFAULT_MODEL):
            raise ConfigError(f"calibrate: needs a trained APM directory (its manifest names its labels), "
                              f"not model={self.model!r}")


MEASURABLE = ("verbosity", "complexity")
COMPLEXITY_SCALES = ("absolute", "relative")


def measured_levels(rows: Sequence[dict[str, Any]], names: Sequence[str],
                    complexity_scale: str = "absolute") -> list[dict[str, int]]:
    """The measurable labels of every row (verbosity, and relative complexity, need all rows: they rank the
    replies to one prompt)."""
    from steerserve.measures import complexity_level, relative_complexity_levels, verbosity_levels

    texts, prompts = [r["response"] for r in rows], [r["prompt"] for r in rows]
    per_row: list[dict[str, int]] = [{} for _ in rows]
    if "verbosity" in names:
        for labels, level in zip(per_row, verbosity_levels(texts, prompts)):
            labels["verbosity"] = level
    if "complexity" in names:
        levels = (relative_complexity_levels(texts, prompts) if complexity_scale == "relative"
                  else [complexity_level(text) for text in texts])
        for labels, level in zip(per_row, levels):
            labels["complexity"] = level
    return per_row


def annotation(row: dict[str, Any], raw: Sequence[float], names: Sequence[str],
               measured: dict[str, int] | None = None) -> dict[str, Any]:
    """One output line: predicted (then measured) levels, the codec's full attribute line, the raw values."""
    levels = {name: to_level(value) for name, value in zip(names, raw)} | (measured or {})
    return {
        "prompt": row["prompt"],
        "response": row["response"],
        "attributes": levels,
        "attribute_line": format_attributes(levels),
        "raw": {name: round(value, 4) for name, value in zip(names, raw)},
    }


def _load_model(config: AnnotateConfig, base: str) -> tuple[Any, Any, list[str]]:
    """A trained APM, or (tiny/default) the base with an untrained head for ``config.attributes``."""
    if config.model in (*TINY_MODELS, DEFAULT_MODEL):
        return load_apm(base, config.attributes or list(ATTRIBUTE_NAMES))
    return load_apm(base)


def annotate_rows(config: AnnotateConfig, rows: list[dict[str, Any]], model: Any, tokenizer: Any,
                  names: list[str], out: Path, on_batch: Sequence[Callable[[int], None]] = ()) -> int:
    """Append annotations for the rows not yet in ``out``; returns how many were already there."""
    from tqdm.auto import tqdm

    measured = measured_levels(rows, config.measured, config.complexity_scale)
    done = len(complete_lines(out))
    if done:
        logger.info("resuming: %d of %d rows already annotated in %s", done, len(rows), out)
    with open(out, "a") as handle, tqdm(total=len(rows), initial=done, desc="annotate", unit="row") as bar:
        for start in range(done, len(rows), config.batch_size):
            chunk = rows[start:start + config.batch_size]
            raw = predict(model, tokenizer, chunk, config.batch_size, config.max_length, names, progress=False)
            handle.writelines(json.dumps(annotation(r, p, names, m)) + "\n"
                              for r, p, m in zip(chunk, raw, measured[start:start + config.batch_size]))
            handle.flush()
            bar.update(len(chunk))
            for callback in on_batch:
                callback(start + len(chunk))
    return done


def agreement(out: Path, rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """MAE / Pearson r of the raw predictions against whatever human labels the input rows carry."""
    predictions = [[line["raw"][name] for name in names] for line in map(json.loads, out.open())]
    return attribute_metrics(rows, predictions, names)


def run(config: AnnotateConfig, output: Path, force: bool = False,
        callbacks: Sequence[Callable[[int], None]] = ()) -> Path:
    """Annotate every usable row (``callbacks`` get the count after each batch); returns the output dir."""
    if distributed.world_size() > 1:  # every rank would label every row into the same file
        raise ValueError("annotate runs in one process: start it without accelerate launch / torchrun")
    run_dir, base, base_name = runner.start(RECIPE, config, output, force)
    work = run_dir.work
    model, tokenizer, names = _load_model(config, base)
    rows, report = load_attribute_rows(config.data, config.data_format, config.data_split, require_labels=False)
    rows = rows[: config.limit]
    # read before the long pass, so an APM without readable labels fails before the rows are labelled
    shares = reference_shares(Path(base), [n for n in names if n not in config.measured]) if config.calibrate else {}
    started = time.perf_counter()
    resumed_at = annotate_rows(config, rows, model, tokenizer, names, work / ANNOTATIONS, callbacks)
    seconds = time.perf_counter() - started
    calibration = None
    if shares:
        calibration = {"level_shares": shares, "thresholds": calibrate_annotations(work / ANNOTATIONS, shares)}
        logger.info("calibrated %s to the level shares of the APM's labels", ", ".join(shares))
    metrics = {"rows_annotated": len(rows), "resumed_at_row": resumed_at,
               "rows_per_second": round((len(rows) - resumed_at) / seconds, 2) if seconds else None,
               "agreement_with_labels": agreement(work / ANNOTATIONS, rows, names)}
    runner.drop_base(work)
    manifest = build_manifest(
        RECIPE, config, base_model=base_name, data=[data_entry(config.data, report, config.data_format)],
        metrics=metrics, steps=len(rows), steering=None, servable=False,
        attributes=[*names, *(m for m in config.measured if m not in names)], measured=config.measured,
        annotations=ANNOTATIONS, calibration=calibration, resumed=run_dir.resumed,
    )
    return run_dir.commit(manifest)


CONFIG = AnnotateConfig
