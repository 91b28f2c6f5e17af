"""Measure a finished steerability result again, from the answers it stored, with today's measures.

    steerserve bench steerability --rescore results/steerability.json.gz --output results/rescored

A steerability run keeps every answer's text, so when a measure changes (``steerserve.measures.FK_MEASURE``
says what the grade counts) its tables need no server and no decoding again: characters and Flesch-Kincaid
grade are recomputed for each answer, the summaries and target checks rebuilt, and the three outputs written
as the run would have written them, with the run's own settings. What the answers were asked with (decoding,
guidance, prompts) is the stored run's; the APM's default-slider scores, which do not depend on the measures,
are kept as they were.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import Any

from steerserve.benchmarks import steerability
from steerserve.measures import FK_MEASURE


def load_result(path: Path) -> dict[str, Any]:
    """A steerability JSON as ``steerserve bench`` wrote it (or gzipped); a clear error if it has no answers."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        payload = json.load(handle)
    variants = payload.get("variants") if isinstance(payload, dict) else None
    if not isinstance(variants, dict) or not all("answers" in r for r in variants.values()):
        raise ValueError(f"{path} is not a steerability result with stored answers")
    return payload


def remeasure(result: dict[str, Any]) -> dict[str, Any]:
    """One variant's result with every answer measured again and its summary rebuilt."""
    answers = [steerability.measured(a) for a in result["answers"]]
    return {**result, "answers": answers, "summary": steerability.summarize(answers)}


def stored_arguments(payload: dict[str, Any], defaults: argparse.Namespace) -> argparse.Namespace:
    """The stored run's arguments over today's defaults (runs that predate an option get its default)."""
    args = argparse.Namespace(**vars(defaults))
    for key, value in payload.get("config", {}).items():
        setattr(args, key, value)
    swept = {a["slider"] for r in payload["variants"].values() for a in r["answers"]}
    args.sliders = [name for name in args.sliders if name in swept] or args.sliders
    return args


def rescore(path: Path, output: Path, defaults: argparse.Namespace) -> dict[str, Path]:
    """Write ``OUTPUT/steerability.{json,md,png}`` from the result at ``path``; returns their paths."""
    from steerserve.benchmarks.report import write_outputs

    payload = load_result(path)
    args = stored_arguments(payload, defaults)
    results = {label: remeasure(r) for label, r in payload["variants"].items()}
    rebuilt, markdown, fig = steerability.finish(results, {}, args)
    for key in ("config", "environment", "seconds"):
        if key in payload:
            rebuilt[key] = payload[key]
    rebuilt["rescored"] = {"from": str(path), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "fkgl": FK_MEASURE,
                           "previous_fkgl": payload.get("measures", {}).get("fkgl", "textstat on the raw text")}
    note = (f"\n\nRe-measured {time.strftime('%Y-%m-%d')} from the stored answers ({FK_MEASURE}); "
            f"the answers themselves are those of the original run.\n")
    return write_outputs(output, steerability.NAME, rebuilt, f"## {steerability.NAME}\n\n{markdown}{note}", fig)
