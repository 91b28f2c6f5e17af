"""Chat rows for SFT: a prompt (chat messages) and the assistant reply to learn.

From conversations (``messages`` ending in an assistant turn, or ``prompt`` +
``response``/``completion``), from preference pairs (the chosen side) and from
attribute rows (per prompt, the reply with the best helpfulness, else quality)::

    rows, report = load_chat_rows("../shared/data/oasst1/oasst1_en_validation.jsonl", "oasst")
    rows[0]  # {"prompt": [{"role": "user", "content": "..."}], "response": "..."}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from steerserve.training.data import attribute_rows, preferences
from steerserve.training.data.fields import require
from steerserve.training.data.io import DataError, LoadReport, load_with, read_records
from steerserve.training.data.preferences import as_messages, as_reply

ChatRow = dict[str, Any]


def _conversations(source: str, split: str, report: LoadReport) -> Iterable[ChatRow]:
    for location, record in read_records(source, split):
        if "messages" in record:
            messages = as_messages(require(record, location, "messages"), location, "messages")
            if not messages or messages[-1]["role"] != "assistant":
                raise DataError(location, "messages", "the last message must be the assistant reply to learn")
            prompt, response = messages[:-1], messages[-1]["content"]
        else:
            prompt = as_messages(require(record, location, "prompt"), location, "prompt")
            field = "response" if "response" in record else "completion"
            response = as_reply(require(record, location, field), location, field)
        if not response.strip() or not any(m["role"] == "user" and m["content"].strip() for m in prompt):
            report.skip(location, "empty prompt or reply")
        else:
            yield {"prompt": prompt, "response": response}


def _chosen(data_format: str) -> Any:
    def read(source: str, split: str, report: LoadReport) -> list[ChatRow]:
        pairs, pair_report = preferences.load_preference_pairs(source, data_format, split)
        report.absorb(pair_report)
        return [{"prompt": pair["prompt"], "response": pair["chosen"]} for pair in pairs]

    return read


def _best_reply(data_format: str) -> Any:
    def score(row: dict[str, Any]) -> float:
        value = row["helpfulness"] if row["helpfulness"] is not None else row["quality"]
        return -1.0 if value is None else value

    def read(source: str, split: str, report: LoadReport) -> list[ChatRow]:
        rows, row_report = attribute_rows.load_attribute_rows(source, data_format, split)
        report.absorb(row_report)
        best: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["prompt"] not in best or score(row) > score(best[row["prompt"]]):
                best[row["prompt"]] = row
        report.skipped["not the best reply to its prompt"] += len(rows) - len(best)
        return [{"prompt": [{"role": "user", "content": p}], "response": r["response"]} for p, r in best.items()]

    return read


READERS = {
    "messages": _conversations,
    "hh-rlhf": _chosen("hh-rlhf"),
    "pairs": _chosen("pairs"),
    "helpsteer": _best_reply("helpsteer"),
    "oasst": _best_reply("oasst"),
}
FORMATS = tuple(READERS)


def load_chat_rows(
    source: str, data_format: str = "messages", split: str = "train"
) -> tuple[list[ChatRow], LoadReport]:
    """All usable chat rows of ``source`` in ``data_format`` (see :data:`FORMATS`), with the report."""
    return load_with(READERS, "chat", source, data_format, split)
