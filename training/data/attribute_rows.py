"""Attribute rows: one prompt, one response and a 0-4 label per SteerLM attribute (None = not labelled).

Readers for HelpSteer / HelpSteer2 (``prompt, response`` + integer attribute
columns, and the ``attributes``/``attribute_line`` rows that ``annotate``
writes) and for Open Assistant oasst1 message trees, whose crowd labels are
fractions 0-1 that the HelpSteer paper rescales to 0-4::

    rows, report = load_attribute_rows("../shared/data/oasst1/oasst1_en_validation.jsonl", "oasst")
    rows[0]  # {"prompt": "...", "response": "...", "quality": 3.0, ..., "verbosity": None}

A missing label is None (masked in the APM's loss), never 0. A row whose
``finish_reason`` is ``length`` (a bootstrapped sample cut at the token cap) is
skipped: it is no finished reply, often a loop, and conditioned SFT on it would
teach the model to end a turn mid-sentence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from steerserve.attributes import (
    ATTRIBUTE_NAMES,
    MAX_LEVEL,
    MIN_LEVEL,
    InvalidAttribute,
    parse_attributes,
    validate_attributes,
)
from steerserve.training.data.fields import as_number, optional_text, require_text
from steerserve.training.data.io import DataError, LoadReport, Location, load_with, read_records

AttributeRow = dict[str, Any]
"""``prompt``, ``response`` and one float-or-None per name in ATTRIBUTE_NAMES."""

# oasst1 label name -> our attribute; the others (spam, violence, ...) have no SteerLM slider.
OASST_LABELS = {name: name for name in ("quality", "toxicity", "humor", "creativity", "helpfulness")}
OASST_SCALE = MAX_LEVEL  # fractions 0-1 -> 0-4, as the HelpSteer paper does


def empty_labels() -> dict[str, float | None]:
    """All attributes masked."""
    return {name: None for name in ATTRIBUTE_NAMES}


def to_level(value: float) -> int:
    """A label or prediction as a slider level: rounded half up, clipped to 0-4."""
    return int(min(MAX_LEVEL, max(MIN_LEVEL, math.floor(value + 0.5))))


def levels(row: AttributeRow) -> dict[str, int]:
    """The labelled attributes of a row as levels (unlabelled ones are left to the codec's defaults)."""
    return {name: to_level(row[name]) for name in ATTRIBUTE_NAMES if row.get(name) is not None}


def labelled(row: AttributeRow) -> list[str]:
    """The attributes a row carries a label for."""
    return [name for name in ATTRIBUTE_NAMES if row.get(name) is not None]


def _check_level(value: float | None, location: Location, field: str) -> float | None:
    if value is not None and not MIN_LEVEL <= value <= MAX_LEVEL:
        raise DataError(location, field, f"label {value} is outside {MIN_LEVEL}-{MAX_LEVEL}")
    return value


def _helpsteer_labels(record: dict[str, Any], location: Location) -> dict[str, float | None]:
    """Labels from flat columns, an ``attributes`` mapping, or an ``attribute_line`` (what annotate writes)."""
    labels = empty_labels()
    line = optional_text(record, location, "attribute_line")
    nested = record.get("attributes")
    try:
        if line is not None:
            labels.update({k: float(v) for k, v in parse_attributes(line, partial=True).items()})
            return labels
        if nested is not None:
            if not isinstance(nested, dict):
                raise DataError(location, "attributes", f"expected a mapping, got {type(nested).__name__}")
            labels.update({k: float(v) for k, v in validate_attributes(nested).items()})
            return labels
    except InvalidAttribute as error:
        raise DataError(location, error.field, str(error)) from None
    for name in ATTRIBUTE_NAMES:
        labels[name] = _check_level(as_number(record.get(name), location, name), location, name)
    return labels


def _helpsteer_rows(source: str, split: str, report: LoadReport, require_labels: bool) -> Iterable[AttributeRow]:
    for location, record in read_records(source, split):
        prompt = require_text(record, location, "prompt")
        response = require_text(record, location, "response")
        labels = _helpsteer_labels(record, location)
        if not prompt.strip() or not response.strip():
            report.skip(location, "empty prompt or response")
        elif record.get("finish_reason") == "length":  # bootstrap samples keep the engine's finish reason
            report.skip(location, "reply cut at the token cap (finish_reason: length)")
        elif require_labels and all(value is None for value in labels.values()):
            report.skip(location, "no attribute labels")
        else:
            yield {"prompt": prompt, "response": response, **labels}


def _oasst_labels(record: dict[str, Any], location: Location) -> dict[str, float | None]:
    labels = empty_labels()
    raw = record.get("labels") or {}
    names, values = raw.get("name") or [], raw.get("value") or []
    if len(names) != len(values):
        raise DataError(location, "labels", f"{len(names)} names but {len(values)} values")
    for name, value in zip(names, values):
        if name not in OASST_LABELS:
            continue
        fraction = as_number(value, location, f"labels.{name}")
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise DataError(location, f"labels.{name}", f"oasst labels are fractions 0-1, got {fraction}")
        labels[OASST_LABELS[name]] = None if fraction is None else fraction * OASST_SCALE
    return labels


def _oasst_rows(source: str, split: str, report: LoadReport, require_labels: bool) -> Iterable[AttributeRow]:
    """Assistant replies with their parent prompt (message trees are resolved within the file)."""
    records = list(read_records(source, split))
    prompts = {
        record.get("message_id"): record.get("text") or ""
        for _, record in records
        if record.get("role") == "prompter"
    }
    for location, record in records:
        role = require_text(record, location, "role")
        if role != "assistant":
            continue  # prompts are context, not rows
        text = require_text(record, location, "text")
        parent = prompts.get(record.get("parent_id"))
        labels = _oasst_labels(record, location)
        if record.get("deleted"):
            report.skip(location, "deleted message")
        elif parent is None:
            report.skip(location, "parent prompt not in the data")
        elif not parent.strip() or not text.strip():
            report.skip(location, "empty prompt or response")
        elif require_labels and all(value is None for value in labels.values()):
            report.skip(location, "no attribute labels")
        else:
            yield {"prompt": parent, "response": text, **labels}


READERS = {"helpsteer": _helpsteer_rows, "oasst": _oasst_rows}
FORMATS = tuple(READERS)


def load_attribute_rows(
    source: str, data_format: str = "helpsteer", split: str = "train", require_labels: bool = True
) -> tuple[list[AttributeRow], LoadReport]:
    """All usable attribute rows of ``source`` in ``data_format`` (see :data:`FORMATS`), with the report.

    ``require_labels=False`` keeps unlabelled prompt/response rows (what ``annotate`` labels).
    """
    return load_with(READERS, "attribute-row", source, data_format, split, require_labels)
