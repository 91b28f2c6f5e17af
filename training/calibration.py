"""Quantile calibration of APM predictions: annotated levels get the spread of the labels the APM learned from.

A regression head trained with a squared loss pulls its predictions toward the mean label. On the steered
default model's bootstrapped replies the APM's raw quality predictions span 2.3-3.3 (5th to 95th percentile)
where its oasst1 labels span 0-4, so rounding gives quality 4 to under 1% of the replies (21% of the labels
are 4) and creativity 0 to one reply in 1,500 (18% of the labels). Attribute-conditioned SFT then almost never
sees the line that a request at default sliders sends (quality 4, helpfulness 4, humor 0, creativity 0), and
every slider sweep asks the model for a line it was not trained on.

Calibration keeps the APM's ranking of the replies and takes each attribute's level shares from the APM's own
labelled data: if 21% of its quality labels are 4, the 21% of replies it ranks highest on quality get 4.
Replies with equal predictions always get the same level.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steerserve.attributes import MAX_LEVEL, MIN_LEVEL, format_attributes
from steerserve.training.data.attribute_rows import load_attribute_rows, to_level


def label_level_shares(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, list[float]]:
    """Per attribute, the share of labelled rows at each level 0-4 (labels rounded as training rounds them)."""
    shares = {}
    for name in names:
        levels = [to_level(row[name]) for row in rows if row.get(name) is not None]
        if not levels:
            raise ValueError(f"no {name} labels to calibrate against")
        shares[name] = [levels.count(level) / len(levels) for level in range(MIN_LEVEL, MAX_LEVEL + 1)]
    return shares


def reference_shares(apm_dir: Path, names: Sequence[str]) -> dict[str, list[float]]:
    """Level shares of the labelled data named in the APM's manifest (what ``steerserve train apm`` read)."""
    manifest_path = apm_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"calibrate: {apm_dir} has no manifest.json naming the data the APM learned from")
    manifest = json.loads(manifest_path.read_text())
    split = manifest.get("hyperparameters", {}).get("data_split", "train")
    rows = []
    for entry in manifest["data"]:
        loaded, _ = load_attribute_rows(entry["source"], entry["format"], split)
        rows.extend(loaded)
    return label_level_shares(rows, names)


def quantile_thresholds(values: Sequence[float], shares: Sequence[float]) -> list[float | None]:
    """The lowest value of levels 1-4 once ``values`` are cut into ``shares`` (None: no value gets that level).

    Cut k sits at the value ranked at the cumulative share of levels below k, so ties fall on one side.
    """
    ordered = sorted(values)
    thresholds: list[float | None] = []
    below = 0.0
    for share in shares[:-1]:
        below += share
        index = round(below * len(ordered))
        thresholds.append(ordered[index] if index < len(ordered) else None)
    return thresholds


def calibrated_level(value: float, thresholds: Sequence[float | None]) -> int:
    """Level of ``value``: how many cuts it reaches."""
    return MIN_LEVEL + sum(cut is not None and value >= cut for cut in thresholds)


def calibrate_annotations(path: Path, shares: Mapping[str, Sequence[float]]) -> dict[str, list[float | None]]:
    """Rewrite annotate's output with calibrated levels for the ``shares`` attributes; returns the cuts.

    Levels come from the stored raw predictions alone, so a rerun after a crash gives the same file; the
    rewrite goes through a temporary file and a rename, so the file is never half calibrated.
    """
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    cuts = {name: quantile_thresholds([line["raw"][name] for line in lines], shares[name]) for name in shares}
    for line in lines:
        line["attributes"] = {**line["attributes"],
                              **{name: calibrated_level(line["raw"][name], cuts[name]) for name in shares}}
        line["attribute_line"] = format_attributes(line["attributes"])
    partial = path.with_suffix(".calibrating")
    partial.write_text("".join(json.dumps(line) + "\n" for line in lines))
    partial.replace(path)
    return {name: [None if cut is None else round(cut, 4) for cut in values] for name, values in cuts.items()}
