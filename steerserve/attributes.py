"""The SteerLM attribute codec, shared by training, serving and benchmarks.

Nine attributes, integers 0-4, with the HelpSteer paper's defaults. One place
knows their names, ranges, order and the text form of the attribute line that
NeMo-Aligner writes after ``<extra_id_2>``::

    >>> line = format_attributes({"verbosity": 1})
    >>> line
    'quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:1'
    >>> parse_attributes(line)["verbosity"]
    1
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Order matters: it is the order of the attribute line the models are trained on.
ATTRIBUTE_DEFAULTS: dict[str, int] = {
    "quality": 4,
    "toxicity": 0,
    "humor": 0,
    "creativity": 0,
    "helpfulness": 4,
    "correctness": 4,
    "coherence": 4,
    "complexity": 4,
    "verbosity": 4,
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTE_DEFAULTS)
MIN_LEVEL = 0
MAX_LEVEL = 4


class InvalidAttribute(ValueError):
    """A bad attribute name or value; ``field`` names the offending key for error JSON."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def validate_attributes(values: Mapping[str, Any] | None) -> dict[str, int]:
    """Check a caller's partial attribute mapping and return it as ints.

    Rejects unknown names and anything that is not an integer in 0-4 (bools and
    floats such as 2.5 included): a slider that silently rounds is a slider
    nobody can trust.
    """
    checked: dict[str, int] = {}
    for name, value in (values or {}).items():
        if name not in ATTRIBUTE_DEFAULTS:
            known = ", ".join(ATTRIBUTE_NAMES)
            raise InvalidAttribute(
                f"unknown attribute {name!r}; known attributes: {known}", f"attributes.{name}"
            )
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():
            value, is_int = int(value), True
        if not is_int or not MIN_LEVEL <= value <= MAX_LEVEL:
            raise InvalidAttribute(
                f"attribute {name!r} must be an integer from {MIN_LEVEL} to {MAX_LEVEL}, got {value!r}",
                f"attributes.{name}",
            )
        checked[name] = value
    return checked


def resolve_attributes(values: Mapping[str, Any] | None) -> dict[str, int]:
    """Validated values over the defaults: the full, ordered set a prompt is built from."""
    return {**ATTRIBUTE_DEFAULTS, **validate_attributes(values)}


def format_attributes(values: Mapping[str, Any] | None) -> str:
    """The SteerLM attribute line (without ``<extra_id_2>`` or newline)."""
    full = resolve_attributes(values)
    return ",".join(f"{name}:{full[name]}" for name in ATTRIBUTE_NAMES)


def parse_attributes(line: str, *, partial: bool = False) -> dict[str, int]:
    """Inverse of :func:`format_attributes`.

    With ``partial`` a line may name a subset (the rest is not filled in); the
    strict form requires all nine, which is what a training line must carry.
    """
    line = line.strip()
    if line.startswith("<extra_id_2>"):
        line = line[len("<extra_id_2>") :]
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in line.split(","))):
        name, sep, raw = item.partition(":")
        if not sep:
            raise InvalidAttribute(f"attribute item {item!r} is not name:value", "attributes")
        try:
            values[name.strip()] = int(raw.strip())
        except ValueError:
            raise InvalidAttribute(
                f"attribute {name.strip()!r} has a non-integer value {raw.strip()!r}",
                f"attributes.{name.strip()}",
            ) from None
    checked = validate_attributes(values)
    missing = [name for name in ATTRIBUTE_NAMES if name not in checked]
    if missing and not partial:
        raise InvalidAttribute(f"attribute line lacks {', '.join(missing)}", "attributes")
    return checked
