"""Typed field access for raw records: every failure is a :class:`DataError` naming file, row and field.

    text = require_text(record, location, "question")   # DataError: "aqua/dev.json row 3: field 'question': missing"
"""

from __future__ import annotations

import math
from typing import Any

from steerserve.training.data.io import DataError, Location


def require(record: dict[str, Any], location: Location, field: str) -> Any:
    """The value of a field that must be present (None counts as absent)."""
    value = record.get(field)
    if value is None:
        present = ", ".join(sorted(record)) or "none"
        raise DataError(location, field, f"missing (fields present: {present})")
    return value


def require_text(record: dict[str, Any], location: Location, field: str) -> str:
    """A string field; empty strings are returned (callers count them as unusable rows)."""
    value = require(record, location, field)
    if not isinstance(value, str):
        raise DataError(location, field, f"expected text, got {type(value).__name__} {value!r:.60}")
    return value


def optional_text(record: dict[str, Any], location: Location, field: str) -> str | None:
    """A string field that may be absent or empty (returned as None then)."""
    value = record.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(location, field, f"expected text, got {type(value).__name__} {value!r:.60}")
    return value


def as_number(value: Any, location: Location, field: str) -> float | None:
    """A label value as float; None, "" and NaN mean "not labelled" (masked), anything else unparsable is an error."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise DataError(location, field, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(location, field, f"expected a number, got {value!r:.60}") from None
    return None if math.isnan(number) else number


def as_index(value: Any, location: Location, field: str, letters: str = "") -> int:
    """An answer index given as an int, a digit string, or (when ``letters`` is given) a letter."""
    if isinstance(value, str) and value.strip().upper() in letters and len(value.strip()) == 1:
        return letters.index(value.strip().upper())
    if isinstance(value, bool):
        raise DataError(location, field, f"expected an answer index, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(location, field, f"expected an answer index or letter, got {value!r:.60}") from None
    if not number.is_integer():
        raise DataError(location, field, f"expected a whole answer index, got {value!r}")
    return int(number)
