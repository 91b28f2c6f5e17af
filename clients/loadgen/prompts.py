"""Prompt sets for load and benchmarks: MT-Bench (or any JSONL of prompts), or random text of a given length.

    prompts = load_prompts("mt_bench", 16)          # first turns of ../shared/data/mt_bench/question.jsonl
    prompts = load_prompts("random:128", 16)        # 16 prompts of ~128 random words each

A file may be JSONL/JSON/CSV with ``turns`` (MT-Bench), ``prompt``, ``question``,
``instruction`` or ``content`` per record. The order is fixed (MT-Bench is taken
round-robin over its categories), so every run and every variant get the same prompts.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

NAMED_SETS = {"mt_bench": "../shared/data/mt_bench/question.jsonl"}
TEXT_FIELDS = ("prompt", "question", "instruction", "content", "text")
# Common short English words: mostly one token each in BPE vocabularies, so words ~ tokens.
_WORDS = ("the of and to in is was for on are with as his they be at one have this from or had by word but "
          "what some we can out other were all there when up use your how said an each she which do their time "
          "if will way about many then them write would like so these her long make thing see him two has look "
          "more day could go come did number sound no most people my over know water than call first who may down "
          "side been now find any new work part take get place made live where after back little only round man "
          "year came show every good me give our under name very through just form sentence great think say help "
          "low line differ turn cause much mean before move right boy old too same tell does set three want air "
          "well also play small end put home read hand port large spell add even land here must big high such").split()


def shared_data(relative: str) -> Path:
    """A path under ``../shared/data`` given relative to the project root, found from any working directory."""
    from steerserve.training.config import resolve_path

    return Path(resolve_path(relative, None))


def _record_text(record: dict[str, Any]) -> str | None:
    turns = record.get("turns")
    if isinstance(turns, list) and turns:
        return str(turns[0])
    for field in TEXT_FIELDS:
        if isinstance(record.get(field), str) and record[field].strip():
            return record[field]
    return None


def _round_robin(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Interleave categories (MT-Bench has 10 per category in a row) so a short prefix covers them all."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[str(record.get("category", ""))].append(record)
    ordered, lists = [], list(groups.values())
    for i in range(max((len(g) for g in lists), default=0)):
        ordered += [g[i] for g in lists if i < len(g)]
    return ordered


def file_prompts(path: Path, count: int | None) -> list[str]:
    """Prompts of a local file, in category round-robin order."""
    from steerserve.training.data.io import read_records

    records = [record for _, record in read_records(path)]
    texts = [text for text in map(_record_text, _round_robin(records)) if text]
    if not texts:
        raise ValueError(f"{path}: no prompts found (fields: turns, {', '.join(TEXT_FIELDS)})")
    return texts[:count] if count else texts


def random_prompts(count: int, length: int, seed: int = 0) -> list[str]:
    """``count`` prompts of ``length`` random common words (distinct, so no prefix cache can help)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(length)) for _ in range(count)]


def load_prompts(spec: str, count: int | None = None, seed: int = 0) -> list[str]:
    """``mt_bench``, ``random:LEN`` or a file path; cycled when fewer prompts than ``count`` exist."""
    if spec.startswith("random:"):
        return random_prompts(count or 1, int(spec.split(":", 1)[1]), seed)
    path = shared_data(NAMED_SETS[spec]) if spec in NAMED_SETS else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"prompt set {spec!r}: {path} does not exist")
    prompts = file_prompts(path, None)
    if count is None:
        return prompts
    return [prompts[i % len(prompts)] for i in range(count)]
