"""The no-collapse check: an attribute prediction model's mean scores for the answers given at default sliders.

A steered model should not buy its sliders with quality: at default sliders its mean predicted helpfulness
should stay near the base model's. ``steerserve bench steerability --apm DIR`` scores a sweep's answers as it
runs; with ``--rescore`` it scores stored ones, so runs swept apart (or before an APM existed) are compared by
one APM without decoding again.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


def apm_problem(apm_dir: str) -> str | None:
    """Why ``apm_dir`` cannot be the APM, or None: checked before a sweep, not after an hour of decoding."""
    return None if (Path(apm_dir) / "config.json").is_file() else f"{apm_dir} is not a model directory (no config.json)"


@functools.lru_cache(maxsize=1)
def _loaded_apm(apm_dir: str) -> tuple[Any, Any, list[str]]:
    """The APM once per run, though a run scores several variants with it."""
    from steerserve.training.apm import load_apm

    return load_apm(apm_dir)


def default_slider_quality(apm_dir: str, prompts: list[str], answers: list[dict[str, Any]]) -> dict[str, float]:
    """Mean APM prediction per attribute over the answers at default sliders (with ``--hold``, at the held
    levels): each prompt once, whichever sweep asked it."""
    from steerserve.attributes import ATTRIBUTE_DEFAULTS
    from steerserve.measures import mean
    from steerserve.training.apm import predict

    model, tokenizer, names = _loaded_apm(apm_dir)
    at_default = {a["prompt"]: a for a in reversed(answers) if a["level"] == ATTRIBUTE_DEFAULTS[a["slider"]]}
    rows = [{"prompt": prompts[prompt], "response": at_default[prompt]["text"]} for prompt in sorted(at_default)]
    predicted = predict(model, tokenizer, rows, 8, 512, names, progress=False)
    return {name: mean([p[j] for p in predicted]) for j, name in enumerate(names)}
