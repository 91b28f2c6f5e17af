"""Named texts read in place from ``../shared/data``: calibration sets, the held-out text and the MCQ sample.

    texts = calibration_texts("oasst1", samples=128)     # what GPTQ / SmoothQuant calibrate on
    texts = calibration_texts("oasst1-chat", samples=128, source=checkpoint)  # as that model is served

Calibration and evaluation never share a source: calibration reads oasst1 or the
MMLU *dev* split; perplexity is measured on MT-Bench reference answers and MCQ
accuracy on the MMLU *test* split.

``oasst1-chat`` is what a served model actually reads: oasst1 prompt -> reply exchanges rendered by the one
prompt renderer with the checkpoint's own chat template and steering method, the verbosity and complexity
sliders spread over all 25 level pairs. Plain oasst1 text never shows a quantizer the system turn, the attribute
line or the template's tokens that steering hangs on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steerserve.prompts import SteeringMethod
from steerserve.training.config import PROJECT_ROOT

Exchange = tuple[str, str]
"""A user prompt and the reply it got."""

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


def oasst_exchanges(samples: int) -> list[Exchange]:
    """The first English oasst1 prompts with a reply of some substance (their first such reply), in file order."""
    prompts: dict[str, str] = {}
    exchanges: list[Exchange] = []
    answered: set[str] = set()
    with _require(OASST).open() as handle:
        for line in handle:
            record = json.loads(line)
            text = record.get("text", "").strip()
            if record.get("role") == "prompter":
                prompts[record["message_id"]] = text
            elif (parent := record.get("parent_id")) in prompts and parent not in answered and len(text) >= 200:
                answered.add(parent)
                exchanges.append((prompts[parent], text))
                if len(exchanges) == samples:
                    break
    return exchanges


def calibration_sliders(index: int) -> dict[str, int]:
    """The verbosity and complexity levels of the ``index``-th chat calibration text: all 25 pairs in turn."""
    return {"verbosity": index % 5, "complexity": index // 5 % 5}


def _render_chats(exchanges: list[Exchange], source: Path) -> list[str]:
    """Each exchange as ``source`` is served: its template, its steering method, the reply and the turn's end."""
    from transformers import AutoTokenizer

    from steerserve.training.runner import chat_prompt, end_of_turn

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    method = served_steering(source, tokenizer)
    return [chat_prompt([{"role": "user", "content": prompt}], calibration_sliders(index), method, tokenizer)
            + reply + end_of_turn(method, tokenizer) for index, (prompt, reply) in enumerate(exchanges)]


def served_steering(source: Path, tokenizer: Any = None) -> SteeringMethod:
    """The steering method ``source`` is served with: its manifest's, else the server's default for its tokenizer."""
    from steerserve.server.variants import default_steering, read_manifest

    steering = read_manifest(source).get("steering")
    if steering:
        return SteeringMethod(steering)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source))
    return default_steering(tokenizer)


CALIBRATION_SETS: dict[str, tuple[Callable[[int], list[str]], Path]] = {
    "oasst1": (_oasst, OASST),
    "mmlu-dev": (_mmlu_dev, MMLU_DEV),
}
CHAT_CALIBRATION_SETS: dict[str, tuple[Callable[[int], list[Exchange]], Path]] = {
    "oasst1-chat": (oasst_exchanges, OASST),
}
"""Sets rendered per checkpoint (they need its tokenizer and steering method)."""
CALIBRATION_NAMES = (*CALIBRATION_SETS, *CHAT_CALIBRATION_SETS)


def calibration_texts(name: str, samples: int, source: Path | None = None) -> list[str]:
    """``samples`` texts of the named calibration set (ValueError naming the known sets).

    A chat set is rendered for the checkpoint ``source``, so it needs one.
    """
    if name in CHAT_CALIBRATION_SETS:
        if source is None:
            raise ValueError(f"calibration set {name!r} is rendered with a checkpoint's chat template; give a source")
        texts = _render_chats(CHAT_CALIBRATION_SETS[name][0](samples), Path(source))
    elif name in CALIBRATION_SETS:
        texts = CALIBRATION_SETS[name][0](samples)
    else:
        raise ValueError(f"unknown calibration set {name!r}; known: {', '.join(CALIBRATION_NAMES)}")
    if not texts:
        raise ValueError(f"calibration set {name!r} yielded no texts")
    return texts


def calibration_entry(name: str, samples: int, max_tokens: int) -> dict[str, Any]:
    """What the manifest records about the calibration data."""
    path = {**CALIBRATION_SETS, **CHAT_CALIBRATION_SETS}[name][1]
    entry = {"name": name, "path": str(path), "samples": samples, "max_tokens": max_tokens}
    if name in CHAT_CALIBRATION_SETS:
        entry["rendering"] = "served chat prompt + reply; verbosity, complexity = i % 5, i // 5 % 5"
    return entry


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
