"""Multiple-choice rows: question, choices, answer index, optional context and explanation.

Readers for SciQ, AQuA-RAT (``options`` like ``"A)32400"`` and a ``rationale``),
MMLU (CSV ``question,choice0..choice3,answer`` or the hub's ``choices`` list),
TruthfulQA MC (``mc1_targets``) and a generic ``question, choices, answer``
shape. Rows are rendered for training with the shared MCQ renderer
(:func:`steerserve.prompts.render_mcq_question` / ``render_mcq_answer``)::

    rows, report = load_mcq_rows("../shared/data/aqua/dev.json", "aqua")
    rows[0]  # {"question": "...", "choices": ["32400", ...], "answer": 0, "context": None, "explanation": "..."}

SciQ and TruthfulQA list the right answer in a fixed place; their choices are
shuffled with a seed derived from the question, so the order is the same on
every run and machine.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable
from typing import Any

from steerserve.prompts import MCQ_LETTERS, validate_choices
from steerserve.training.data.fields import as_index, optional_text, require, require_text
from steerserve.training.data.io import DataError, LoadReport, Location, load_with, read_records

MCQRow = dict[str, Any]

_AQUA_OPTION = re.compile(r"^\s*([A-J])\s*\)\s*(.*)$", re.DOTALL)


def _shuffled(choices: list[str], correct: int, question: str, seed: int) -> tuple[list[str], int]:
    """Choices in a stable pseudo-random order (seeded by the question) and the new answer index."""
    order = list(range(len(choices)))
    digest = hashlib.sha256(f"{seed}:{question}".encode()).digest()
    random.Random(digest).shuffle(order)
    return [choices[i] for i in order], order.index(correct)


def _row(question: str, choices: list[str], answer: int, context: str | None = None,
         explanation: str | None = None) -> MCQRow:
    return {"question": question, "choices": choices, "answer": answer, "context": context,
            "explanation": explanation}


def _sciq(record: dict[str, Any], location: Location, seed: int) -> MCQRow:
    """SciQ: three distractors and the correct answer; ``support`` becomes the explanation.

    Not the context: serving asks the bare question, so training must not lean on the passage.
    """
    question = require_text(record, location, "question")
    correct = require_text(record, location, "correct_answer")
    distractors = [require_text(record, location, f"distractor{i}") for i in (1, 2, 3)]
    choices, answer = _shuffled([correct, *distractors], 0, question, seed)
    return _row(question, choices, answer, explanation=optional_text(record, location, "support"))


def _aqua(record: dict[str, Any], location: Location, seed: int) -> MCQRow:
    question = require_text(record, location, "question")
    options = require(record, location, "options")
    if not isinstance(options, list):
        raise DataError(location, "options", f"expected a list of 'A)...' strings, got {type(options).__name__}")
    choices = []
    for position, option in enumerate(options):
        match = _AQUA_OPTION.match(str(option))
        if not match or match.group(1) != MCQ_LETTERS[position]:
            expected = f"{MCQ_LETTERS[position]})..."
            raise DataError(location, "options", f"option {position + 1} {option!r:.40} is not '{expected}'")
        choices.append(match.group(2).strip())
    answer = as_index(require(record, location, "correct"), location, "correct", MCQ_LETTERS)
    return _row(question, choices, answer, explanation=optional_text(record, location, "rationale"))


def _mmlu(record: dict[str, Any], location: Location, seed: int) -> MCQRow:
    """The CSV form (``choice0..choice3``) or the hub form (``choices`` list); answer index or letter."""
    question = require_text(record, location, "question")
    if "choices" in record:
        choices = require(record, location, "choices")
        if not isinstance(choices, list):
            raise DataError(location, "choices", f"expected a list, got {type(choices).__name__}")
    else:
        choices = [require_text(record, location, f"choice{i}") for i in range(4)]
    answer = as_index(require(record, location, "answer"), location, "answer", MCQ_LETTERS)
    return _row(question, [str(choice) for choice in choices], answer)


def _truthfulqa(record: dict[str, Any], location: Location, seed: int) -> MCQRow:
    """TruthfulQA multiple_choice: ``mc1_targets`` = {choices, labels} with exactly one label 1."""
    question = require_text(record, location, "question")
    targets = require(record, location, "mc1_targets")
    if not isinstance(targets, dict) or "choices" not in targets or "labels" not in targets:
        raise DataError(location, "mc1_targets", "expected {choices: [...], labels: [...]}")
    choices, labels = list(targets["choices"]), list(targets["labels"])
    if len(choices) != len(labels) or labels.count(1) != 1:
        raise DataError(location, "mc1_targets", "needs as many labels as choices, exactly one of them 1")
    shuffled, answer = _shuffled([str(c) for c in choices], labels.index(1), question, seed)
    return _row(question, shuffled, answer)


def _generic(record: dict[str, Any], location: Location, seed: int) -> MCQRow:
    question = require_text(record, location, "question")
    choices = require(record, location, "choices")
    if not isinstance(choices, list):
        raise DataError(location, "choices", f"expected a list, got {type(choices).__name__}")
    answer = as_index(require(record, location, "answer"), location, "answer", MCQ_LETTERS)
    return _row(question, [str(choice) for choice in choices], answer,
                optional_text(record, location, "context"), optional_text(record, location, "explanation"))


PARSERS = {"sciq": _sciq, "aqua": _aqua, "mmlu": _mmlu, "truthfulqa": _truthfulqa, "mcq": _generic}
FORMATS = tuple(PARSERS)


def _usable(row: MCQRow, location: Location, report: LoadReport) -> bool:
    """Well-formed rows the renderer cannot take (e.g. 13 choices) are counted, not raised."""
    if not 0 <= row["answer"] < len(row["choices"]):
        raise DataError(location, "answer", f"index {row['answer']} but only {len(row['choices'])} choices")
    try:
        validate_choices(row["choices"])
    except ValueError as error:
        report.skip(location, f"choices: {error}")
        return False
    if not row["question"].strip():
        report.skip(location, "empty question")
        return False
    return True


def _reader(parse: Callable[[dict[str, Any], Location, int], MCQRow]) -> Callable[..., Iterable[MCQRow]]:
    def read(source: str, split: str, report: LoadReport, seed: int) -> Iterable[MCQRow]:
        for location, record in read_records(source, split):
            row = parse(record, location, seed)
            if _usable(row, location, report):
                yield row

    return read


READERS = {name: _reader(parse) for name, parse in PARSERS.items()}


def load_mcq_rows(
    source: str, data_format: str = "mcq", split: str = "train", seed: int = 0
) -> tuple[list[MCQRow], LoadReport]:
    """All usable MCQ rows of ``source`` in ``data_format`` (see :data:`FORMATS`), with the report."""
    return load_with(READERS, "MCQ", source, data_format, split, seed)
