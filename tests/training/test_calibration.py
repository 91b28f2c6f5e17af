"""Quantile calibration of annotate's APM levels: shares follow the APM's labels, ranking and ties kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_helpers import run_recipe

from steerserve.attributes import parse_attributes
from steerserve.training.annotate import AnnotateConfig
from steerserve.training.calibration import (
    calibrated_level,
    label_level_shares,
    quantile_thresholds,
    reference_shares,
)
from steerserve.training.config import ConfigError
from steerserve.training.manifest import read_manifest


def test_cuts_give_each_level_its_share() -> None:
    values = [0.1 * i for i in range(20)]
    cuts = quantile_thresholds(values, [0.1, 0.2, 0.3, 0.2, 0.2])
    levels = [calibrated_level(v, cuts) for v in values]
    assert [levels.count(level) for level in range(5)] == [2, 4, 6, 4, 4]
    assert levels == sorted(levels)  # the APM's ranking is kept


def test_empty_levels_and_ties() -> None:
    cuts = quantile_thresholds([1.0, 2.0, 3.0, 4.0], [0.0, 0.5, 0.5, 0.0, 0.0])
    assert cuts[2:] == [None, None]  # nothing reaches levels 3 and 4
    assert [calibrated_level(v, cuts) for v in (1.0, 2.0, 3.0, 4.0)] == [1, 1, 2, 2]
    tied = quantile_thresholds([2.0] * 6 + [3.0] * 2, [0.2] * 5)
    assert len({calibrated_level(2.0, tied)}) == 1 and calibrated_level(3.0, tied) > calibrated_level(2.0, tied)


def test_label_shares_round_like_training() -> None:
    rows = [{"humor": 0.0}, {"humor": 0.2}, {"humor": 0.5}, {"humor": 3.9}, {"humor": None}]
    assert label_level_shares(rows, ["humor"]) == {"humor": [0.5, 0.25, 0.0, 0.0, 0.25]}
    with pytest.raises(ValueError, match="no quality labels"):
        label_level_shares(rows, ["quality"])


def test_calibrate_needs_a_trained_apm() -> None:
    with pytest.raises(ConfigError, match="calibrate"):
        AnnotateConfig(model="tiny", data="rows.jsonl", data_format="oasst", calibrate=True)


@pytest.mark.slow
def test_calibrated_annotate_matches_the_label_shares(tmp_path: Path, apm_run: Path, attribute_file: Path,
                                                      annotate_run: Path) -> None:
    out = run_recipe("annotate", tmp_path / "ann", [f"model={apm_run}", f"data={attribute_file}",
                                                    "data_format=helpsteer", "batch_size=5", "calibrate=true",
                                                    "measured=[verbosity]"])
    lines = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (annotate_run / "annotations.jsonl").read_text().splitlines()]
    assert [line["raw"] for line in lines] == [line["raw"] for line in plain]  # the same predictions, re-levelled
    calibration = read_manifest(out)["calibration"]
    shares = calibration["level_shares"]
    assert "verbosity" not in shares  # measured, so not the APM's to calibrate
    assert shares == reference_shares(apm_run, list(shares))
    for name, expected in shares.items():
        levels = [line["attributes"][name] for line in lines]
        counts = [levels.count(level) / len(levels) for level in range(5)]
        ranked = sorted(zip((line["raw"][name] for line in lines), levels))
        assert [level for _, level in ranked] == sorted(levels), name  # monotone in the raw prediction
        if len({line["raw"][name] for line in lines}) == len(lines):  # no ties: shares met to a row
            assert all(abs(c - e) <= 1 / len(lines) + 1e-9 for c, e in zip(counts, expected)), name
    for line in lines:
        assert {k: v for k, v in parse_attributes(line["attribute_line"]).items()
                if k in line["attributes"]} == line["attributes"]
