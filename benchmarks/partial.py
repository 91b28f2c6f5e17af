"""Finished measurements of an interrupted benchmark run, kept so that rerunning the command goes on from them.

A steerability sweep of two models on 80 prompts runs for hours on 2 cores; losing the first model's answers to
a crash in the second (or to Ctrl-C) would cost all of it again. After each variant, its result goes to
``OUTPUT/.partial/NAME.json``; the same command run again reuses the variants already there and measures the
rest. The file is dropped once the benchmark's outputs are written.

Only benchmarks whose results do not depend on when they ran are resumed (a module sets ``RESUMABLE = True``):
greedy or seeded answers and MCQ scores, not latency, whose ratios hold only within one invocation. One variant's
sweep alone can outlast a session (80 prompts x 9 requests: 40 minutes), so a module that also sets
``ANSWER_LOG = True`` gets an ``AnswerLog``: each answer is appended to it as it arrives, and a rerun asks only
for the answers missing there.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from steerserve.staging import write_text_atomic
from steerserve.training.output import write_json_atomic

logger = logging.getLogger(__name__)

NOT_MEASUREMENT = frozenset({"output", "url", "model", "name", "rescore", "request_timeout"})
"""Arguments that choose where results go, which served models to pick or how long to wait, not how each is
measured: a rerun may name more models, the same server on another port, or wait longer for a slow variant's
answers, and still reuse what was measured."""


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

    def answer_log(self, name: str, label: str) -> AnswerLog:
        """Where benchmark ``name`` logs target ``label``'s answers one by one (under this run's key)."""
        return AnswerLog(self.folder / f"{name}-answers" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}.jsonl",
                         self.key)

    def clear(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)
        shutil.rmtree(self.folder / f"{name}-answers", ignore_errors=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


class AnswerLog:
    """One target's answers so far, one JSON line each, behind a first line holding the run's key.

    Used as a context manager: entering reads the answers a run with the same key left (a line cut short by a
    kill is dropped, a log of other arguments is started afresh), rewrites the file with just those, and opens it
    for ``append``; each answer is flushed as it is written.
    """

    def __init__(self, path: Path, key: dict[str, Any]) -> None:
        self.path = path
        self.key = json.loads(json.dumps(key, default=str))
        self.answers: dict[str, dict[str, Any]] = {}
        self._file: Any = None

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        lines = self.path.read_text().splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            head = {}
        if head.get("key") != self.key:
            logger.info("%s: left by a run with other arguments; answering everything again", self.path)
            return {}
        answers = {}
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written when the run was stopped
            answers[record["id"]] = record["answer"]
        return answers

    def __enter__(self) -> AnswerLog:
        self.answers = self._read()
        if self.answers:
            logger.info("%s: %d answers kept from an interrupted run", self.path, len(self.answers))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [{"key": self.key}, *({"id": k, "answer": v} for k, v in self.answers.items())]
        write_text_atomic(self.path, "".join(json.dumps(line) + "\n" for line in lines))
        self._file = self.path.open("a")
        return self

    def append(self, answer_id: str, answer: dict[str, Any]) -> None:
        self.answers[answer_id] = answer
        self._file.write(json.dumps({"id": answer_id, "answer": answer}) + "\n")
        self._file.flush()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._file.close()


def _int_keys(value: Any) -> Any:
    """JSON made the int keys of a result (slider levels) strings; give them back as the measurement made them."""
    if isinstance(value, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int_keys(v) for v in value]
    return value
