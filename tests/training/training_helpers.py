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


def guided_pair(engine: str, model: Path, folder: Path) -> tuple[tuple[float, int], tuple[float, int]]:
    """Greedy samples of one prompt without and with reading-level guidance at complexity 0 (strength 3): the
    word-lengthening score and the sentence ends of each, re-tokenised."""
    from transformers import AutoTokenizer

    from steerserve.reading_level import ReadingLevelGuide
    from steerserve.training.sampling import sample

    tokenizer = AutoTokenizer.from_pretrained(model)
    guide = ReadingLevelGuide.from_tokenizer(tokenizer)
    scores, ends = dict(guide.scores), set(guide.sentence_ends)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}], tokenize=False,
                                           add_generation_prompt=True)
    plain = {"prompt": prompt, "temperature": 0.0, "max_tokens": 16, "seed": 0}
    guided = dict(plain, reading_level=[0, 3.0])
    out = folder / "samples.part.jsonl"
    texts = [got["text"] for got in sample(str(model), [plain, guided], out, engine=engine)]
    measured = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        measured.append((sum(scores.get(i, 0.0) for i in ids), sum(i in ends for i in ids)))
    assert texts[0] != texts[1]
    return measured[0], measured[1]


