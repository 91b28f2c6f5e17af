"""The prompt renderer: SteerLM format, chat-template placement, instructions, MCQ."""

import pytest

from steerserve.attributes import format_attributes
from steerserve.prompts import (
    LEVEL_INSTRUCTIONS,
    MCQ_ANSWER_PREFIX,
    SteeringMethod,
    render_chat,
    render_mcq_answer,
    render_mcq_question,
    stop_strings,
    steering_instruction,
)

CHATML = lambda msgs: "".join(f"<|{m['role']}|>{m['content']}\n" for m in msgs) + "<|assistant|>"  # noqa: E731


def test_steerlm_single_turn_matches_nemo_aligner() -> None:
    text = render_chat([{"role": "user", "content": "Hi"}], {"verbosity": 1}, SteeringMethod.STEERLM)
    line = format_attributes({"verbosity": 1})
    assert text == f"<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n<extra_id_2>{line}\n"


def test_steerlm_multi_turn_has_one_attribute_line_per_assistant_turn() -> None:
    messages = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    text = render_chat(messages, None, SteeringMethod.STEERLM)
    assert text.startswith("<extra_id_0>System\nBe nice.\n<extra_id_1>User\nQ1\n<extra_id_1>Assistant\n<extra_id_2>")
    assert text.count("<extra_id_2>") == 2
    assert "\nA1\n<extra_id_1>User\nQ2\n" in text
    assert stop_strings(SteeringMethod.STEERLM) == ["<extra_id_1>"]


def test_chat_template_puts_attribute_line_last_in_system_turn() -> None:
    text = render_chat(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        {"complexity": 0},
        SteeringMethod.CHAT_TEMPLATE,
        CHATML,
    )
    assert text == f"<|system|>S\n<extra_id_2>{format_attributes({'complexity': 0})}\n<|user|>Q\n<|assistant|>"


def test_instructions_always_state_verbosity_and_complexity() -> None:
    text = steering_instruction({"verbosity": 0})
    assert LEVEL_INSTRUCTIONS["verbosity"][0] in text
    assert LEVEL_INSTRUCTIONS["complexity"][4] in text
    assert LEVEL_INSTRUCTIONS["humor"][0] not in text  # default humor is not restated
    assert LEVEL_INSTRUCTIONS["humor"][3] in steering_instruction({"humor": 3})


def test_instructions_join_a_callers_system_message() -> None:
    text = render_chat(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        {"verbosity": 2},
        SteeringMethod.INSTRUCTIONS,
        CHATML,
    )
    assert text.startswith(f"<|system|>{steering_instruction({'verbosity': 2})}\n\nS\n")


def test_template_methods_need_a_template() -> None:
    with pytest.raises(ValueError, match="chat template"):
        render_chat([{"role": "user", "content": "Q"}], None, SteeringMethod.INSTRUCTIONS)


def test_mcq_question_and_answer_share_the_answer_token() -> None:
    question = render_mcq_question("2+2?", ["3", "4", "5"], context="Arithmetic.")
    assert question.splitlines()[:6] == ["Arithmetic.", "", "Question: 2+2?", "A. 3", "B. 4", "C. 5"]
    prompt = render_chat([{"role": "user", "content": question}], None, SteeringMethod.STEERLM, None, MCQ_ANSWER_PREFIX)
    answer = render_mcq_answer(1, "two and two")
    assert prompt.endswith("Answer:") and answer.startswith("Answer: B")
    assert answer == "Answer: B\nExplanation: two and two"


@pytest.mark.parametrize("choices", [["only"], [str(i) for i in range(11)], ["a", " "]])
def test_mcq_rejects_bad_choices(choices: list[str]) -> None:
    with pytest.raises(ValueError):
        render_mcq_question("q", choices)
