"""The steerability measures and the target check, on fixed texts (no server): what a sweep's numbers mean."""

from __future__ import annotations

import math

import pytest
import textstat

from steerserve.measures import chars, fk_grade, median, prose_lines, ranks, spearman


def test_target_check_needs_monotone_and_size() -> None:
    from steerserve.benchmarks.steerability import target_check

    assert target_check("verbosity", {0: 100, 1: 150, 2: 200, 3: 250, 4: 310})["met"]
    assert not target_check("verbosity", {0: 100, 1: 150, 2: 140, 3: 250, 4: 310})["met"]  # not monotone
    assert not target_check("verbosity", {0: 100, 1: 150, 2: 200, 3: 250, 4: 290})["met"]  # x2.9
    gap = target_check("complexity", {0: 5.0, 1: 6.0, 2: 6.5, 3: 7.0, 4: 7.5})
    assert gap["gap"] == pytest.approx(2.5) and gap["met"]


def test_measures() -> None:
    assert chars("  Hello.\n") == 6
    assert fk_grade("The cat sat on the mat.") < fk_grade(
        "Photosynthesis converts electromagnetic radiation into chemical energy through chlorophyll.")
    assert math.isnan(fk_grade("   "))
    assert fk_grade("It was the best of times, it was the worst of times, it was the age of wisdom.") == (
        pytest.approx(textstat.flesch_kincaid_grade("It was the best of times, it was the worst of times, it was "
                                                    "the age of wisdom.")))  # plain prose: textstat's grade


def test_reading_grade_is_the_prose_s() -> None:
    """Code, list markers and line breaks: a list of short lines reads as short sentences, code is not read."""
    answer = ("# Plan\n\nHere is the plan:\n\n1. Buy milk\n2) Feed the cat\n- Call `mom` today!\n> Quoted line\n\n"
              "```python\nfor value in sorted(collection): print(value)\n```\n\n~~~\nunterminated_code_block(")
    assert prose_lines(answer) == ["Plan.", "Here is the plan.", "Buy milk.", "Feed the cat.", "Call mom today!",
                                   "Quoted line."]
    looping = "\n".join(["- The first point: the main features of the two models are"] * 40)
    assert fk_grade(looping) < 8 < textstat.flesch_kincaid_grade(looping)  # one 480-word "sentence" raw
    assert math.isnan(fk_grade("```\nx = compute(y)\n```"))  # code alone has no reading level
    short_items = "\n".join(["Design"] * 30)  # textstat drops one-word "sentences": 30 words in one
    assert fk_grade(short_items) == pytest.approx(0.39 * 1 + 11.8 * 2 - 15.59)
    assert ranks([3, 1, 3]) == [2.5, 1.0, 2.5]
    assert spearman([0, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert spearman([0, 0, 1, 1, 2], [3, 1, 4, 1, 5]) == pytest.approx(0.6488856845)  # scipy.stats.spearmanr
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert median([3.0, 1879.0, 2.0]) == 3.0 and median([4.0, math.nan, 1.0, 3.0, 2.0]) == 2.5
    assert math.isnan(median([math.nan]))


@pytest.mark.parametrize(("text", "unfinished"), [
    ("It is done.", False), ('He said "go."\n', False), ("**Done!**", False), ("She said “stop.”", False),
    ("```python\nx = 1\n```", False), ("Consider the following:", True),
    ("The secret that no one had ever discovered", True), ("1, 2, 3,", True), ("(see above)", True), ("", False),
])
def test_unfinished_answers_end_on_a_word_or_a_colon(text: str, unfinished: bool) -> None:
    from steerserve.benchmarks.steerability import _unfinished
    from steerserve.measures import ends_unfinished

    assert ends_unfinished(text) is unfinished
    answers = [{"text": text, "finish_reason": "stop"}, {"text": "Cut at the cap", "finish_reason": "length"}]
    assert _unfinished(answers) == float(unfinished)  # answers cut at the cap are not counted


def test_looping_answers_repeat_their_second_half() -> None:
    from steerserve.benchmarks.steerability import summarize
    from steerserve.measures import loops

    opening = " ".join(f"word{i}" for i in range(40))
    looping = opening + " " + " ".join(["The cat sat on the mat and then it slept."] * 12)
    varied = opening + " " + " ".join(f"Step {i} adds the {i}th ingredient to the bowl." for i in range(12))
    assert loops(looping) and not loops(varied)
    assert not loops("Yes. " * 10)  # ten words: too few sequences in the second half to tell
    answers = [{"slider": "verbosity", "level": lvl, "text": text, "finish_reason": "length", "chars": len(text),
                "fkgl": 5.0} for lvl in range(5) for text in (looping, varied)]
    assert summarize(answers)["verbosity"]["looping"] == 0.5
