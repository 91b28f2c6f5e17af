"""Measure a finished steerability result again, from the answers it stored, with today's measures.

    steerserve bench steerability --rescore results/steerability.json.gz --output results/rescored
    steerserve bench steerability --rescore runs/a/steerability.json runs/b/steerability.json --output joined

A steerability run keeps every answer's text, so when a measure changes (``steerserve.measures.FK_MEASURE``
says what the grade counts) its tables need no server and no decoding again: characters and Flesch-Kincaid
grade are recomputed for each answer, the summaries and target checks rebuilt, and the three outputs written
as the run would have written them, with the run's own settings. What the answers were asked with (decoding,
guidance, prompts) is the stored run's; the APM's default-slider scores, which do not depend on the measures,
are kept as they were, or with ``--apm DIR`` scored again for every variant by that one APM (runs scored by
different APMs, or by none, made comparable; the answers at default sliders are in every result).

Several results are joined into one table (precisions swept on different servers, a reference from another run):
every variant is cut to the prompts all of them answered, by prompt text, so a 40-prompt sweep sits beside the same
40 of an 80-prompt one. Results answered under different caps or decoding are refused: one table states one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import Any

from steerserve.benchmarks import steerability
from steerserve.benchmarks.no_collapse import default_slider_quality
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


def _source(path: Path) -> str:
    """A short name for the result a variant came from (its folder for a plain ``steerability.json``)."""
    name = path.name.removesuffix(".gz").removesuffix(".json")
    return path.parent.name if name == "steerability" else name


def _cut(result: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    """One variant's result kept to ``prompts``, its answers' prompt indices renumbered to that list; its APM
    scores of the default-slider answers go where prompts were dropped (they averaged over those too)."""
    index = {text: i for i, text in enumerate(prompts)}
    own = result["prompts"]
    answers = [{**a, "prompt": index[own[a["prompt"]]]} for a in result["answers"] if own[a["prompt"]] in index]
    kept = {**result, "prompts": prompts, "answers": answers}
    if len(own) != len(prompts):
        kept.pop("default_slider_apm", None)  # scored on prompts no longer in the table
    return kept


def join(loaded: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """Several results as one: every variant cut to the prompts common to all; the first result's settings, its
    prompt count made the common one. A label two results share gets its source's name after it."""
    if len(loaded) == 1:
        return loaded[0][1]
    results = [(path, label, r) for path, payload in loaded for label, r in payload["variants"].items()]
    for path, label, r in results:
        if not isinstance(r.get("prompts"), list):
            raise ValueError(f"{path}: {label} stored no prompts, so it cannot be joined to other results")
    first_path, first_label, first = results[0]
    for path, label, r in results[1:]:
        for key in ("max_tokens", "decoding"):
            if r.get(key) != first.get(key):
                raise ValueError(f"{path}: {label} was answered with {key} {r.get(key)}, {first_path}: "
                                 f"{first_label} with {first.get(key)}: one table states one")
    common = [p for p in first["prompts"] if all(p in r["prompts"] for _, _, r in results)]
    if not common:
        raise ValueError("the results share no prompt")
    variants: dict[str, Any] = {}
    for path, label, r in results:
        key = label if label not in variants else f"{label} [{_source(path)}]"
        variants[key if key not in variants else f"{key} #{len(variants)}"] = _cut(r, common)
    payload = loaded[0][1]
    config = {**payload.get("config", {}), "num_prompts": len(common), "joined": [str(p) for p, _ in loaded]}
    return {**payload, "variants": variants, "config": config}


def stored_arguments(payload: dict[str, Any], defaults: argparse.Namespace) -> argparse.Namespace:
    """The stored run's arguments over today's defaults (runs that predate an option get its default)."""
    args = argparse.Namespace(**vars(defaults))
    for key, value in payload.get("config", {}).items():
        setattr(args, key, value)
    swept = {a["slider"] for r in payload["variants"].values() for a in r["answers"]}
    args.sliders = [name for name in defaults.sliders if name in swept] or args.sliders  # joined: any swept
    return args


def rescore(paths: list[Path], output: Path, defaults: argparse.Namespace, apm: str | None = None) -> dict[str, Path]:
    """Write ``OUTPUT/steerability.{json,md,png}`` from the results at ``paths`` (joined when several), each
    variant's default-slider answers scored by the APM at ``apm`` when given; returns their paths."""
    from steerserve.benchmarks.report import write_outputs

    payload = join([(path, load_result(path)) for path in paths])
    args = stored_arguments(payload, defaults)
    results = {label: steerability.remeasure(r) for label, r in payload["variants"].items()}
    if apm is not None:
        for r in results.values():
            r["default_slider_apm"] = default_slider_quality(apm, r["prompts"], r["answers"])
    rebuilt, markdown, fig = steerability.finish(results, {}, args)
    for key in ("config", "environment", "seconds"):
        if key in payload:
            rebuilt[key] = payload[key]
    rebuilt["rescored"] = {"from": [str(path) for path in paths], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                           "fkgl": FK_MEASURE,
                           "previous_fkgl": payload.get("measures", {}).get("fkgl", "textstat on the raw text"),
                           **({"apm": apm} if apm is not None else {})}
    note = (f"\n\nRe-measured {time.strftime('%Y-%m-%d')} from the stored answers ({FK_MEASURE}); "
            f"the answers themselves are those of the original run.\n")
    return write_outputs(output, steerability.NAME, rebuilt, f"## {steerability.NAME}\n\n{markdown}{note}", fig)
