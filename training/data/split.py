"""Train/test split grouped by prompt, deterministic by seed.

Every row of one prompt (all pairs of one question, all replies of one
HelpSteer prompt) lands on the same side, so held-out metrics never score a
prompt the model trained on. A group's side depends only on the seed and the
prompt's text, not on row order::

    train, test = grouped_split(pairs, prompt_key, test_fraction=0.1, seed=0)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

Row = TypeVar("Row")


def prompt_key(row: dict[str, Any]) -> str:
    """The grouping key of any of the three row shapes: the prompt (text or messages) or the question."""
    if "question" in row:
        return f"{row.get('context') or ''}\n{row['question']}".strip()
    prompt = row["prompt"]
    return prompt.strip() if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def grouped_split(
    rows: Sequence[Row], key: Callable[[Row], str] = prompt_key, test_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Row], list[Row]]:
    """(train, test): about ``test_fraction`` of the prompt groups held out, at least one each side if possible."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    keys = sorted({key(row) for row in rows}, key=lambda k: _rank(k, seed))
    n_test = round(len(keys) * test_fraction)
    if test_fraction > 0 and len(keys) >= 2:
        n_test = min(max(n_test, 1), len(keys) - 1)
    held_out = set(keys[:n_test])
    train = [row for row in rows if key(row) not in held_out]
    test = [row for row in rows if key(row) in held_out]
    return train, test
