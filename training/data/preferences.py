"""Preference pairs: a prompt (chat messages), a chosen and a rejected assistant reply.

Four sources: oasst1 sibling ranks (``oasst-ranks``), HH-RLHF transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``),
any JSON/JSONL/CSV/parquet with ``prompt, chosen, rejected`` (text or TRL's
conversational lists), and attribute rows (two replies to one prompt, the more
helpful one chosen, ties dropped; or, as ``helpsteer-sliders``, attribute-conditioned
pairs: the reply that matches the attribute line chosen over one two levels away)::

    pairs, report = load_preference_pairs("../shared/data/hh-rlhf/harmless-base_test.jsonl.gz", "hh-rlhf")
    pairs[0]  # {"prompt": [{"role": "user", "content": "..."}, ...], "chosen": "...", "rejected": "..."}
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from typing import Any

from steerserve.training.data.attribute_rows import AttributeRow, levels, load_attribute_rows, to_level
from steerserve.training.data.fields import require
from steerserve.training.data.io import DataError, LoadReport, Location, load_with, read_records

PreferencePair = dict[str, Any]
Messages = list[dict[str, str]]

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str, location: Location, field: str) -> Messages:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> chat messages."""
    pieces = _HH_TURN.split(text)
    if len(pieces) < 3 or pieces[0].strip():
        raise DataError(location, field, "not an HH-RLHF transcript (must start with '\\n\\nHuman: ')")
    return [
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(pieces[1::2], pieces[2::2])
    ]


def _split_last_reply(messages: Messages) -> tuple[Messages, str] | None:
    """(prompt turns, final assistant reply), or None when the transcript does not end on a reply."""
    if not messages or messages[-1]["role"] != "assistant":
        return None
    return messages[:-1], messages[-1]["content"]


def _hh_pairs(source: str, split: str, report: LoadReport) -> Iterable[PreferencePair]:
    for location, record in read_records(source, split):
        sides = {}
        for field in ("chosen", "rejected"):
            value = require(record, location, field)
            if not isinstance(value, str):
                raise DataError(location, field, f"expected a transcript string, got {type(value).__name__}")
            sides[field] = _split_last_reply(parse_hh_transcript(value, location, field))
        chosen, rejected = sides["chosen"], sides["rejected"]
        if chosen is None or rejected is None:
            report.skip(location, "transcript does not end with an assistant reply")
        elif chosen[0] != rejected[0]:
            report.skip(location, "chosen and rejected continue different conversations")
        else:
            yield from _checked_pair(chosen[0], chosen[1], rejected[1], location, report)


def _checked_pair(
    prompt: Messages, chosen: str, rejected: str, location: Location, report: LoadReport
) -> Iterable[PreferencePair]:
    """The pair, unless it cannot teach a preference (empty side, identical replies, no user turn)."""
    if not chosen.strip() or not rejected.strip():
        report.skip(location, "empty reply")
    elif chosen.strip() == rejected.strip():
        report.skip(location, "chosen and rejected are identical")
    elif not any(message["role"] == "user" for message in prompt):
        report.skip(location, "no user turn in the prompt")
    else:
        yield {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def as_messages(value: Any, location: Location, field: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in value]
    raise DataError(location, field, "expected text or a list of {role, content} messages")


def as_reply(value: Any, location: Location, field: str) -> str:
    """A reply given as text, or as TRL's conversational ``[{"role": "assistant", ...}]``."""
    if isinstance(value, str):
        return value
    messages = as_messages(value, location, field) if isinstance(value, list) else None
    if messages and messages[-1]["role"] == "assistant":
        return messages[-1]["content"]
    raise DataError(location, field, "expected text or messages ending with an assistant reply")


def _plain_pairs(source: str, split: str, report: LoadReport) -> Iterable[PreferencePair]:
    for location, record in read_records(source, split):
        prompt = as_messages(require(record, location, "prompt"), location, "prompt")
        chosen = as_reply(require(record, location, "chosen"), location, "chosen")
        rejected = as_reply(require(record, location, "rejected"), location, "rejected")
        yield from _checked_pair(prompt, chosen, rejected, location, report)


def pairs_from_attribute_rows(
    rows: list[AttributeRow], report: LoadReport, by: str = "helpfulness"
) -> list[PreferencePair]:
    """Every two replies to one prompt with different ``by`` labels; ties and unlabelled rows are counted."""
    groups: dict[str, list[tuple[Location, AttributeRow]]] = {}
    for number, row in enumerate(rows, start=1):
        location = Location(f"{report.source} (attribute rows)", number)
        if row.get(by) is None:
            report.skip(location, f"no {by} label")
        else:
            groups.setdefault(row["prompt"], []).append((location, row))
    pairs: list[PreferencePair] = []
    for prompt, group in groups.items():
        if len(group) < 2:
            report.skip(group[0][0], "only one labelled reply to its prompt")
        for (_, first), (location, second) in itertools.combinations(group, 2):
            if first[by] == second[by]:
                report.skip(location, f"tie in {by}")
                continue
            chosen, rejected = (first, second) if first[by] > second[by] else (second, first)
            messages = [{"role": "user", "content": prompt}]
            pairs.extend(_checked_pair(messages, chosen["response"], rejected["response"], location, report))
    return pairs


SLIDERS = ("verbosity", "complexity")
"""The attributes slider pairs contrast: the two a caller moves most, and measured rather than predicted."""
SLIDER_GAP = 2
"""Levels two replies must differ by on a slider to make a pair: one level apart is within label noise."""


def slider_pairs_from_attribute_rows(rows: list[AttributeRow], report: LoadReport,
                                     sliders: Iterable[str] = SLIDERS, gap: int = SLIDER_GAP) -> list[PreferencePair]:
    """Attribute-conditioned pairs: two replies to one prompt that sit at least ``gap`` levels apart on a slider
    make two pairs, each conditioned on one reply's own labels (its attribute line), that reply chosen.

    So the preference is for the reply that matches the line over the one that does not: what a slider asks
    of the model, learned as a contrast rather than from one reply at a time (AC-SFT). Pairs carry the
    ``attributes`` (levels) their prompt is rendered with.
    """
    groups: dict[str, list[tuple[Location, AttributeRow]]] = {}
    for number, row in enumerate(rows, start=1):
        groups.setdefault(row["prompt"], []).append((Location(f"{report.source} (attribute rows)", number), row))
    pairs: list[PreferencePair] = []
    for prompt, group in groups.items():
        messages = [{"role": "user", "content": prompt}]
        for (_, first), (location, second) in itertools.combinations(group, 2):
            apart = [name for name in sliders if first.get(name) is not None and second.get(name) is not None
                     and abs(to_level(first[name]) - to_level(second[name])) >= gap]
            if not apart:
                report.skip(location, f"no slider {gap} levels apart from an earlier reply to its prompt")
                continue
            for pair in _checked_pair(messages, first["response"], second["response"], location, report):
                pairs.append({**pair, "attributes": levels(first), "contrast": apart})
                pairs.append({**pair, "chosen": pair["rejected"], "rejected": pair["chosen"],
                              "attributes": levels(second), "contrast": apart})
    return pairs


def _conversation(message_id: str, by_id: dict[str, dict[str, Any]]) -> Messages:
    """The turns from the tree's root down to ``message_id`` (oasst1 message trees)."""
    turns: Messages = []
    while message_id in by_id:
        record = by_id[message_id]
        turns.append({"role": "user" if record.get("role") == "prompter" else "assistant",
                       "content": record.get("text") or ""})
        message_id = record.get("parent_id")
    return turns[::-1]


def _oasst_rank_pairs(source: str, split: str, report: LoadReport) -> Iterable[PreferencePair]:
    """Sibling assistant replies of an oasst1 tree: the better-ranked one (lower ``rank``) chosen.

    Every two ranked siblings make a pair; the prompt is the whole conversation up to their parent,
    so follow-up turns keep their context. Unranked or deleted replies are skipped with the reason.
    """
    records = list(read_records(source, split))
    by_id = {record.get("message_id"): record for _, record in records}
    siblings: dict[str, list[tuple[Location, dict[str, Any]]]] = {}
    for location, record in records:
        if record.get("role") != "assistant":
            continue
        if record.get("deleted"):
            report.skip(location, "deleted message")
        elif record.get("rank") is None:
            report.skip(location, "no sibling rank")
        elif record.get("parent_id") not in by_id:
            report.skip(location, "parent prompt not in the data")
        else:
            siblings.setdefault(record["parent_id"], []).append((location, record))
    for parent, group in siblings.items():
        prompt = _conversation(parent, by_id)
        ranked = sorted(group, key=lambda item: item[1]["rank"])
        for (_, better), (location, worse) in itertools.combinations(ranked, 2):
            if better["rank"] == worse["rank"]:
                report.skip(location, "tie in rank")
                continue
            yield from _checked_pair(prompt, better.get("text") or "", worse.get("text") or "", location, report)


def _attribute_pairs(data_format: str, make: Any = pairs_from_attribute_rows) -> Any:
    def read(source: str, split: str, report: LoadReport) -> list[PreferencePair]:
        rows, row_report = load_attribute_rows(source, data_format, split)
        report.absorb(row_report)
        return make(rows, report)

    return read


READERS = {
    "hh-rlhf": _hh_pairs,
    "pairs": _plain_pairs,
    "helpsteer": _attribute_pairs("helpsteer"),
    "oasst": _attribute_pairs("oasst"),
    "oasst-ranks": _oasst_rank_pairs,
    "helpsteer-sliders": _attribute_pairs("helpsteer", slider_pairs_from_attribute_rows),
}
FORMATS = tuple(READERS)


def load_preference_pairs(
    source: str, data_format: str = "pairs", split: str = "train"
) -> tuple[list[PreferencePair], LoadReport]:
    """All usable pairs of ``source`` in ``data_format`` (see :data:`FORMATS`), with the report."""
    return load_with(READERS, "preference", source, data_format, split)
