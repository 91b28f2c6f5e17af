"""The attribute codec: defaults, validation, and the SteerLM line round trip."""

import pytest

from steerserve.attributes import (
    ATTRIBUTE_DEFAULTS,
    ATTRIBUTE_NAMES,
    InvalidAttribute,
    format_attributes,
    parse_attributes,
    resolve_attributes,
)


def test_defaults_are_the_papers() -> None:
    assert ATTRIBUTE_NAMES == (
        "quality", "toxicity", "humor", "creativity", "helpfulness",
        "correctness", "coherence", "complexity", "verbosity",
    )
    assert format_attributes(None) == (
        "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,verbosity:4"
    )


@pytest.mark.parametrize("level", range(5))
def test_round_trip_every_level(level: int) -> None:
    values = {name: level for name in ATTRIBUTE_NAMES}
    assert parse_attributes(format_attributes(values)) == values
    assert parse_attributes("<extra_id_2>" + format_attributes(values)) == values


def test_partial_values_take_defaults() -> None:
    resolved = resolve_attributes({"verbosity": 1, "complexity": 2})
    assert resolved == {**ATTRIBUTE_DEFAULTS, "verbosity": 1, "complexity": 2}
    assert list(resolved) == list(ATTRIBUTE_NAMES)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"verbose": 1}, "attributes.verbose"),
        ({"verbosity": 5}, "attributes.verbosity"),
        ({"verbosity": -1}, "attributes.verbosity"),
        ({"complexity": 2.5}, "attributes.complexity"),
        ({"humor": "3"}, "attributes.humor"),
        ({"humor": True}, "attributes.humor"),
    ],
)
def test_bad_values_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(InvalidAttribute) as info:
        resolve_attributes(values)
    assert info.value.field == field


def test_integral_float_is_accepted() -> None:
    assert resolve_attributes({"verbosity": 2.0})["verbosity"] == 2


def test_strict_parse_needs_all_nine() -> None:
    with pytest.raises(InvalidAttribute, match="lacks"):
        parse_attributes("verbosity:1")
    assert parse_attributes("verbosity:1", partial=True) == {"verbosity": 1}
    with pytest.raises(InvalidAttribute):
        parse_attributes("verbosity=1", partial=True)
    with pytest.raises(InvalidAttribute):
        parse_attributes("verbosity:x", partial=True)
