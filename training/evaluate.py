"""Held-out MCQ accuracy, scored the way the server scores MCQ requests.

The prompt is the shared renderer's user turn + ``assistant_prefix="Answer:"``; the
prediction is the most likely of the answer-letter tokens (``" A"``, ``" B"``, ...)::

    accuracy = mcq_accuracy(model, tokenizer, test_rows, SteeringMethod.INSTRUCTIONS)
"""

from __future__ import annotations

import logging
from typing import Any

from steerserve.prompts import MCQ_ANSWER_PREFIX, SteeringMethod, mcq_answer_token_text, render_mcq_question
from steerserve.training.runner import chat_prompt

logger = logging.getLogger(__name__)


def letter_token_ids(tokenizer: Any, count: int) -> list[int] | None:
    """The token id of each answer letter after ``Answer:``, or None if one is not a single token."""
    ids = [tokenizer.encode(mcq_answer_token_text(i), add_special_tokens=False) for i in range(count)]
    return [piece[0] for piece in ids] if all(len(piece) == 1 for piece in ids) else None


def mcq_prompt(row: dict[str, Any], method: SteeringMethod, tokenizer: Any) -> str:
    """What the server renders for an MCQ request on this row (no attributes: the defaults)."""
    question = render_mcq_question(row["question"], row["choices"], row.get("context"))
    return chat_prompt([{"role": "user", "content": question}], None, method, tokenizer, MCQ_ANSWER_PREFIX)


def mcq_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]], method: SteeringMethod) -> dict[str, Any]:
    """``mcq_accuracy``, ``mcq_scored``, ``mcq_chance`` over ``rows``.

    Rows whose answer letters are not single tokens are not scored (and a warning says how many).
    """
    import torch
    from tqdm.auto import tqdm

    correct = scored = 0
    chance = 0.0
    model.eval()
    with torch.no_grad():
        for row in tqdm(rows, desc="MCQ accuracy", leave=False):
            letters = letter_token_ids(tokenizer, len(row["choices"]))
            if letters is None:
                continue
            ids = tokenizer(mcq_prompt(row, method, tokenizer), return_tensors="pt").input_ids.to(model.device)
            logits = model(input_ids=ids).logits[0, -1, letters]
            correct += int(int(logits.argmax()) == row["answer"])
            scored += 1
            chance += 1 / len(row["choices"])
    if scored < len(rows):
        logger.warning("MCQ accuracy: %d of %d rows not scored (answer letters not single tokens)",
                       len(rows) - scored, len(rows))
    return {
        "mcq_accuracy": correct / scored if scored else None,
        "mcq_scored": scored,
        "mcq_chance": chance / scored if scored else None,
    }
