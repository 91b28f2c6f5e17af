"""Finished measurements of an interrupted benchmark run, kept so that rerunning the command goes on from them.

A steerability sweep of two models on 80 prompts runs for hours on 2 cores; losing the first model's answers to
a crash in the second (or to Ctrl-C) would cost all of it again. After each variant, its result goes to
``OUTPUT/.partial/NAME.json``; the same command run again reuses the variants already there and measures the
rest. The file is dropped once the benchmark's outputs are written.

Only benchmarks whose results do not depend on when they ran are resumed (a module sets ``RESUMABLE = True``):
greedy answers and MCQ scores, not latency, whose ratios hold only within one invocation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from steerserve.training.output import write_json_atomic

logger = logging.getLogger(__name__)

NOT_MEASUREMENT = frozenset({"output", "url", "model", "name"})
"""Arguments that choose where results go or which served models to pick, not how each is measured: a rerun
may name more models, or the same server on another port, and still reuse what was measured."""


class PartialResults:
    """Per benchmark, the results finished so far by a run with the same measurement arguments."""

    def __init__(self, output: Path, config: dict[str, Any]) -> None:
        self.folder = output / ".partial"
        self.key = {k: v for k, v in sorted(config.items()) if k not in NOT_MEASUREMENT}

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def load(self, name: str) -> dict[str, dict[str, Any]]:
        """The results an interrupted run with these arguments left, by target label (empty if none)."""
        path = self._path(name)
        if not path.is_file():
            return {}
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("%s: unreadable (%s); measuring everything again", path, exc)
            return {}
        if saved.get("key") != json.loads(json.dumps(self.key, default=str)):
            logger.info("%s: left by a run with other arguments; measuring everything again", path)
            return {}
        return _int_keys(saved.get("results", {}))

    def save(self, name: str, results: dict[str, dict[str, Any]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._path(name), {"key": self.key, "results": results})

    def clear(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _int_keys(value: Any) -> Any:
    """JSON made the int keys of a result (slider levels) strings; give them back as the measurement made them."""
    if isinstance(value, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int_keys(v) for v in value]
    return value
