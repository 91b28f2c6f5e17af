"""``steerserve mcq``: ask one multiple-choice question, or score a file of them (accuracy).

    steerserve mcq --url http://127.0.0.1:8000 "2+2=?" --choice 3 --choice 4
    steerserve mcq --file ../shared/data/aqua/dev.json --format aqua --limit 100 --json results/aqua.json

Files are read by the training loaders (:mod:`steerserve.training.data.mcq`:
generic ``question, choices, answer``, MMLU, AQuA-RAT, SciQ, TruthfulQA), so
the CLI, the ``mcq`` benchmark and training agree on every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm


def score_rows(client: Any, model: str, rows: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
               attributes: Mapping[str, int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy of ``model`` on loader rows (each with ``answer``), asked through the batch MCQ route.

    Batches keep HTTP overhead small without letting one request grow unbounded (the server takes 256 items).
    """
    correct, predictions = 0, []
    start = time.perf_counter()
    batches = range(0, len(rows), batch_size)
    for offset in tqdm(batches, desc=f"mcq {model}", unit="batch", disable=not progress):
        chunk = rows[offset:offset + batch_size]
        response = client.mcq_batch(model, chunk, attributes=attributes)
        for row, result in zip(chunk, response.results or [], strict=True):
            predictions.append(result.index)
            correct += int(result.index == row["answer"])
    total = len(rows)
    return {"model": model, "total": total, "correct": correct, "accuracy": correct / total if total else 0.0,
            "chance": sum(1 / len(row["choices"]) for row in rows) / total if total else 0.0,
            "seconds": time.perf_counter() - start, "predictions": predictions}


def load_rows(path: str, data_format: str, limit: int | None) -> list[dict[str, Any]]:
    """Rows of an MCQ file or folder in a supported format (the first ``limit`` of them)."""
    from steerserve.training.data.mcq import load_mcq_rows

    rows, _ = load_mcq_rows(path, data_format)
    return rows[:limit] if limit else rows


def _parser() -> argparse.ArgumentParser:
    from steerserve.training.data.mcq import FORMATS

    parser = argparse.ArgumentParser(prog="steerserve mcq", description="Answer multiple-choice questions with a "
                                     "steerserve model: one question, or a file scored for accuracy.")
    parser.add_argument("question", nargs="?", help="one question (give its options with --choice)")
    parser.add_argument("--choice", action="append", default=[], help="an option of the question (repeat, 2-10)")
    parser.add_argument("--context", help="a passage the question is about")
    parser.add_argument("--file", help="a JSONL/JSON/CSV file (or folder) of questions with answers")
    parser.add_argument("--format", default="mcq", choices=FORMATS, help="the file's format (default: generic mcq)")
    parser.add_argument("--limit", type=int, help="score only the first N rows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model id (default: the server's first model)")
    parser.add_argument("--attributes", help="sliders, e.g. verbosity=1")
    parser.add_argument("--explain", action="store_true", help="one question: also generate an explanation")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--api-key")
    return parser


def _single(client: Any, model: str, args: argparse.Namespace, attributes: dict[str, int]) -> dict[str, Any]:
    response = client.mcq(model, args.question, args.choice, context=args.context, attributes=attributes or None,
                          explain=args.explain)
    result = {"model": model, "answer": response.answer, "index": response.index,
              "probabilities": response.probabilities, "explanation": response.explanation}
    print(f"{response.answer}) {args.choice[response.index]}")
    for letter, probability in (response.probabilities or {}).items():
        print(f"  {letter}: {probability:.3f}")
    if response.explanation:
        print(response.explanation)
    return result


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from steerserve.clients.chat_cli import parse_attribute_flags
    from steerserve.clients.client import SteerAPIError, SteerClient

    if (args.question is None) == (args.file is None):
        print("steerserve mcq: give a question (with --choice options) or --file", file=sys.stderr)
        return 2
    attributes = parse_attribute_flags(args.attributes)
    with SteerClient(args.url, api_key=args.api_key) as client:
        try:
            model = args.model or client.models().data[0].id
            if args.question is not None:
                result = _single(client, model, args, attributes)
            else:
                rows = load_rows(args.file, args.format, args.limit)
                result = score_rows(client, model, rows, batch_size=args.batch_size, attributes=attributes or None)
                result["source"] = args.file
                print(f"{model}: accuracy {result['accuracy']:.3f} ({result['correct']}/{result['total']}; "
                      f"chance {result['chance']:.3f})")
        except SteerAPIError as exc:
            print(f"steerserve mcq: {exc}", file=sys.stderr)
            return 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
