"""Reading records from local files (JSONL, JSON, CSV, parquet) or a Hugging Face data set name.

Every record comes with its location (file and line/row), so a loader that finds
a bad field can say exactly where; unusable rows are counted in a
:class:`LoadReport`, never dropped silently::

    for where, record in read_records("../shared/data/aqua/dev.json"):
        print(where, record["question"])   # "…/aqua/dev.json:1" {...}
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz")


class DataError(ValueError):
    """A record that cannot be read: names the file, the line/row and the field."""

    def __init__(self, location: Location, field: str | None, message: str) -> None:
        where = f"{location}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")
        self.location, self.field = location, field


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a record came from; ``row`` is the 1-based line (JSONL) or data row (CSV, JSON array)."""

    source: str
    row: int

    def __str__(self) -> str:
        kind = "line" if self.source.endswith((".jsonl", ".jsonl.gz")) else "row"
        return f"{self.source} {kind} {self.row}"


@dataclasses.dataclass
class LoadReport:
    """How many records a loader used and why it skipped the others (for logs and the manifest)."""

    source: str
    used: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    first_skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def skip(self, location: Location, reason: str) -> None:
        """Count one unusable record under ``reason`` (the first location per reason is kept)."""
        self.skipped[reason] += 1
        self.first_skipped.setdefault(reason, str(location))

    def absorb(self, other: LoadReport) -> None:
        """Take over the skip counts of a loader this one is built on (pairs from attribute rows, ...)."""
        self.skipped.update(other.skipped)
        for reason, where in other.first_skipped.items():
            self.first_skipped.setdefault(reason, where)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "used": self.used,
            "skipped": dict(self.skipped),
            "first_skipped": self.first_skipped,
        }

    def log(self) -> None:
        total = sum(self.skipped.values())
        logger.info("%s: used %d rows, skipped %d %s", self.source, self.used, total, dict(self.skipped))


Reader = Callable[..., Iterable[dict[str, Any]]]
"""``reader(source, split, report, *extra)`` yields usable rows and counts the others in ``report``."""


def load_with(readers: dict[str, Reader], kind: str, source: str, data_format: str, split: str,
              *extra: Any) -> tuple[list[dict[str, Any]], LoadReport]:
    """Run the reader registered for ``data_format``; the rows and the report (logged)."""
    if data_format not in readers:
        raise ValueError(f"unknown {kind} format {data_format!r}; known: {', '.join(readers)}")
    report = LoadReport(source=str(source))
    rows = list(readers[data_format](source, split, report, *extra))
    report.used = len(rows)
    report.log()
    return rows, report


def is_local(source: str | Path) -> bool:
    """A local path: one that exists, or that looks like a path (so a typo fails here, not on the hub)."""
    text = str(source)
    looks_like_path = text.startswith(("/", ".", "~")) or text.endswith(SUFFIXES) or "\\" in text
    return Path(text).exists() or looks_like_path


def data_files(source: str | Path) -> list[Path]:
    """The readable files of a path: the file itself, or a directory's supported files, sorted."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(SUFFIXES)} files in this directory")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    return [path]


def file_sha256(path: Path) -> str:
    """Content hash recorded in the manifest, so a run names exactly the data it saw."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_records(source: str | Path, split: str = "train") -> Iterator[tuple[Location, dict[str, Any]]]:
    """Records of a local file/directory, or of a hub data set (``split``) when ``source`` is no local path."""
    if not is_local(source):
        yield from _read_hub(str(source), split)
        return
    for path in data_files(source):
        yield from _read_file(path)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _read_file(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
    elif name.endswith(".csv"):
        yield from _read_csv(path)
    elif name.endswith(".json"):
        yield from _read_json(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    with _open_text(path) as handle:
        yield from _parse_lines(path, handle)


def _parse_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[Location, dict[str, Any]]]:
    """One JSON object per non-blank line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        location = Location(str(path), number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(location, None, f"not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(location, None, f"expected a JSON object, got {type(record).__name__}")
        yield location, record


def _read_json(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    """A JSON array of objects, or (as AQuA-RAT's ``dev.json`` really is) JSON lines under a .json name."""
    with _open_text(path) as handle:
        text = handle.read()
    if not text.lstrip().startswith("["):
        yield from _read_jsonl_text(path, text)
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(Location(str(path), error.lineno), None, f"not valid JSON ({error.msg})") from None
    for number, record in enumerate(records, start=1):
        location = Location(str(path), number)
        if not isinstance(record, dict):
            raise DataError(location, None, f"expected a JSON object, got {type(record).__name__}")
        yield location, record


def _read_jsonl_text(path: Path, text: str) -> Iterator[tuple[Location, dict[str, Any]]]:
    """JSON lines already in memory; a pretty-printed object spanning lines is read whole."""
    try:
        single = json.loads(text)
    except json.JSONDecodeError:
        single = None
    if isinstance(single, dict):
        yield Location(str(path), 1), single
    else:
        yield from _parse_lines(path, text.splitlines())


def _read_csv(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        for number, record in enumerate(reader, start=1):
            location = Location(str(path), number)
            if None in record:
                raise DataError(location, None, f"more cells than the header's {len(reader.fieldnames or [])}")
            yield location, record


def _read_parquet(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for number, record in enumerate(table.to_pylist(), start=1):
        yield Location(str(path), number), record


def _read_hub(name: str, split: str) -> Iterator[tuple[Location, dict[str, Any]]]:
    """A Hugging Face data set, for users who are online; ``name`` may carry a config as ``name:config``."""
    from datasets import load_dataset

    repo, _, config = name.partition(":")
    logger.info("loading %s (config %s, split %s) from the Hugging Face hub", repo, config or "default", split)
    dataset = load_dataset(repo, config or None, split=split)
    for number, record in enumerate(dataset, start=1):
        yield Location(f"hf:{name}[{split}]", number), dict(record)
