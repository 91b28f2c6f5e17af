"""Helpers shared by the training tests (a plain module: conftest.py names clash across test folders)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from steerserve.training.config import load_config

FAST = ["max_steps=3", "batch_size=2", "eval_batch_size=4", "max_length=192", "logging_steps=1",
        "save_steps=2", "learning_rate=0.005", "test_fraction=0.25", "lora=false"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_recipe(recipe: str, output: Path, settings: list[str], force: bool = False, callbacks: tuple = ()) -> Path:
    """A recipe run through the same config loader the CLI uses."""
    module = importlib.import_module(f"steerserve.training.{recipe}")
    config = load_config(module.CONFIG, None, settings)
    return module.run(config, output, force=force, callbacks=callbacks)
