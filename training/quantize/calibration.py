"""Named texts read in place from ``../shared/data``: calibration sets, the held-out text and the MCQ sample.

    texts = calibration_texts("oasst1", samples=128)     # what GPTQ / SmoothQuant calibrate on

Calibration and evaluation never share a source: calibration reads oasst1 or the
MMLU *dev* split; perplexity is measured on MT-Bench reference answers and MCQ
accuracy on the MMLU *test* split.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steerserve.training.config import PROJECT_ROOT

DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
OASST = DATA_DIR / "oasst1" / "oasst1_en_validation.jsonl"
MMLU_DEV = DATA_DIR / "mmlu" / "dev"
MMLU_TEST = DATA_DIR / "mmlu" / "test"
MT_BENCH_ANSWERS = DATA_DIR / "mt_bench" / "reference_answer_gpt-4.jsonl"


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (the shared data sets live in {DATA_DIR})")
    return path


def _oasst(samples: int) -> list[str]:
    """The first English oasst1 messages with some substance, in file order."""
    texts = []
    with _require(OASST).open() as handle:
        for line in handle:
            text = json.loads(line).get("text", "").strip()
            if len(text) >= 200:
                texts.append(text)
            if len(texts) == samples:
                break
    return texts


def mmlu_rows(folder: Path, per_subject: int) -> list[dict[str, Any]]:
    """The first ``per_subject`` rows of every subject, subjects sorted: a fixed, spread-out sample."""
    rows = []
    for path in sorted(_require(folder).glob("*.csv")):
        with path.open(newline="") as handle:
            for index, row in enumerate(csv.DictReader(handle)):
                if index == per_subject:
                    break
                choices = [row[f"choice{i}"] for i in range(4)]
                rows.append({"subject": path.stem.rsplit("_", 1)[0], "question": row["question"],
                             "choices": choices, "answer": int(row["answer"])})
    return rows


def _mmlu_dev(samples: int) -> list[str]:
    """MMLU dev questions with their answer written out, as plain text."""
    texts = [f"Question: {r['question']}\n" + "\n".join(f"{l}. {c}" for l, c in zip("ABCD", r["choices"]))
             + f"\nAnswer: {'ABCD'[r['answer']]}" for r in mmlu_rows(MMLU_DEV, 5)]
    return texts[:samples]


CALIBRATION_SETS: dict[str, tuple[Callable[[int], list[str]], Path]] = {
    "oasst1": (_oasst, OASST),
    "mmlu-dev": (_mmlu_dev, MMLU_DEV),
}


def calibration_texts(name: str, samples: int) -> list[str]:
    """``samples`` texts of the named calibration set (ValueError naming the known sets)."""
    if name not in CALIBRATION_SETS:
        raise ValueError(f"unknown calibration set {name!r}; known: {', '.join(CALIBRATION_SETS)}")
    texts = CALIBRATION_SETS[name][0](samples)
    if not texts:
        raise ValueError(f"calibration set {name!r} yielded no texts")
    return texts


def calibration_entry(name: str, samples: int, max_tokens: int) -> dict[str, Any]:
    """What the manifest records about the calibration data."""
    return {"name": name, "path": str(CALIBRATION_SETS[name][1]), "samples": samples, "max_tokens": max_tokens}


def held_out_text(max_chars: int) -> str:
    """MT-Bench GPT-4 reference answers, file order, joined: the fixed perplexity text."""
    parts, total = [], 0
    with _require(MT_BENCH_ANSWERS).open() as handle:
        for line in handle:
            for turn in json.loads(line)["choices"][0]["turns"]:
                parts.append(turn.strip())
                total += len(parts[-1])
            if total >= max_chars:
                break
    return "\n\n".join(parts)[:max_chars]
