"""Loaders for the three row shapes the recipes take, and the grouped split.

    from steerserve.training.data import load_rows
    rows, report = load_rows("mcq", "../shared/data/aqua/dev.json", "aqua")
"""

from __future__ import annotations

from typing import Any

from steerserve.training.data.attribute_rows import load_attribute_rows
from steerserve.training.data.chat import load_chat_rows
from steerserve.training.data.io import DataError, LoadReport
from steerserve.training.data.mcq import load_mcq_rows
from steerserve.training.data.preferences import load_preference_pairs
from steerserve.training.data.split import grouped_split, prompt_key

# row shape -> loader(source, data_format, split, ...) -> (rows, report)
LOADERS = {
    "attributes": load_attribute_rows,
    "preferences": load_preference_pairs,
    "mcq": load_mcq_rows,
    "chat": load_chat_rows,
}


def load_rows(
    shape: str, source: str, data_format: str, split: str = "train"
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Rows of one shape (``attributes``, ``preferences``, ``mcq``, ``chat``) from ``source`` in ``data_format``."""
    if shape not in LOADERS:
        raise ValueError(f"unknown row shape {shape!r}; known: {', '.join(LOADERS)}")
    return LOADERS[shape](source, data_format, split)


__all__ = ["DataError", "LoadReport", "LOADERS", "grouped_split", "load_rows", "prompt_key"]
