"""Property tests (hypothesis) for the attribute codec and the prompt renderer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from steerserve.attributes import ATTRIBUTE_NAMES, format_attributes, parse_attributes, resolve_attributes
from steerserve.prompts import (
    MCQ_LETTERS,
    SteeringMethod,
    render_chat,
    render_mcq_answer,
    render_mcq_question,
)

levels = st.integers(min_value=0, max_value=4)
partial_attributes = st.dictionaries(st.sampled_from(ATTRIBUTE_NAMES), levels)
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), min_size=1, max_size=40)
line_text = text.filter(lambda t: t.strip() and "\n" not in t)


@given(partial_attributes)
def test_format_parse_round_trip(values: dict[str, int]) -> None:
    line = format_attributes(values)
    assert parse_attributes(line) == resolve_attributes(values)
    assert "\n" not in line and line.count(",") == len(ATTRIBUTE_NAMES) - 1


@given(st.lists(line_text, min_size=1, max_size=4), partial_attributes)
def test_steerlm_one_attribute_line_per_assistant_turn(turns: list[str], values: dict[str, int]) -> None:
    messages = []
    for i, content in enumerate(turns):
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": f"reply {i}"}]
    prompt = render_chat(messages[:-1], values, SteeringMethod.STEERLM)
    assert prompt.count("<extra_id_2>") == len(turns)
    assert prompt.endswith(f"<extra_id_2>{format_attributes(values)}\n")
    assert prompt.count("<extra_id_1>User\n") == len(turns)


@given(line_text, st.lists(line_text, min_size=2, max_size=10), st.one_of(st.none(), line_text))
def test_mcq_renderer_letters_every_choice_once(question: str, choices: list[str], context: str | None) -> None:
    rendered = render_mcq_question(question, choices, context)
    lines = rendered.split("\n")
    lettered = [line for line in lines if line[:3] in {f"{letter}. " for letter in MCQ_LETTERS}]
    assert lettered[-len(choices):] == [f"{letter}. {c.strip()}" for letter, c in zip(MCQ_LETTERS, choices)]
    assert lines[-1] == "Answer with the letter of the correct choice."


@given(st.integers(min_value=0, max_value=9), st.one_of(st.none(), line_text))
def test_mcq_answer_starts_with_the_scored_token(index: int, explanation: str | None) -> None:
    answer = render_mcq_answer(index, explanation)
    assert answer.startswith(f"Answer: {MCQ_LETTERS[index]}")
    assert ("\nExplanation: " in answer) == bool(explanation and explanation.strip())
