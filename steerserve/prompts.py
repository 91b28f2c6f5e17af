"""The one prompt renderer: chat (three steering methods) and multiple choice.

Training, serving and benchmarks all build prompts here, so a model is served
with exactly the text it was trained on (down to the ``" A"`` answer token)::

    >>> render_chat([{"role": "user", "content": "Hi"}], {"verbosity": 1}, SteeringMethod.STEERLM)
    '<extra_id_0>System\\n\\n<extra_id_1>User\\nHi\\n<extra_id_1>Assistant\\n<extra_id_2>quality:4,...,verbosity:1\\n'

Steering methods:

* ``steerlm`` - NeMo-Aligner's SteerLM format; one ``<extra_id_2>`` attribute
  line opens every assistant turn; generation stops at ``<extra_id_1>``.
* ``chat-template`` - the model's own chat template; the attribute line is the
  last line of the system turn (what attribute-conditioned SFT trains on for
  models that have a template).
* ``instructions`` - for models never attribute-conditioned: a plain-language
  system instruction per slider level.
* ``described`` - ``chat-template``'s attribute line followed by its
  plain-language description (the ``instructions`` text). Small models learn a
  bare attribute line slowly; with the description the base model already half
  follows the condition, and attribute-conditioned SFT on measured labels
  sharpens that (the steered default model is trained this way).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from steerserve.attributes import ATTRIBUTE_DEFAULTS, format_attributes, resolve_attributes

SYSTEM_TURN = "<extra_id_0>"
TURN = "<extra_id_1>"
ATTRIBUTE_TURN = "<extra_id_2>"
STEERLM_STOP = TURN
# What NeMo-Aligner's SteerLM recipes put in the system turn by default.
STEERLM_DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

MCQ_LETTERS = "ABCDEFGHIJ"
MCQ_MIN_CHOICES = 2
MCQ_MAX_CHOICES = len(MCQ_LETTERS)
MCQ_ANSWER_PREFIX = "Answer:"
MCQ_INSTRUCTION = "Answer with the letter of the correct choice."
MCQ_EXPLANATION_PREFIX = "\nExplanation:"

Message = Mapping[str, Any]
ApplyTemplate = Callable[[list[dict[str, str]]], str]


class SteeringMethod(str, enum.Enum):
    """How a model turns attribute sliders into its prompt."""

    STEERLM = "steerlm"
    CHAT_TEMPLATE = "chat-template"
    INSTRUCTIONS = "instructions"
    DESCRIBED = "described"


# Plain-language phrasing per level, for models that never saw an attribute line.
# verbosity and complexity are always stated; the rest only when not at default.
LEVEL_INSTRUCTIONS: dict[str, tuple[str, str, str, str, str]] = {
    "verbosity": (
        "Answer in one short sentence, with no elaboration.",
        "Answer briefly, in two or three sentences.",
        "Answer at moderate length.",
        "Answer in detail, with explanation and examples.",
        "Answer very thoroughly and at length, covering every relevant aspect with examples.",
    ),
    "complexity": (
        "Use very simple words and short sentences a young child understands.",
        "Use plain everyday language.",
        "Use language a high-school student understands.",
        "Use the language of an educated adult reader.",
        "Use precise, technical, expert-level language.",
    ),
    "quality": (
        "Give a low-quality answer.",
        "Give a mediocre answer.",
        "Give a reasonable answer.",
        "Give a good answer.",
        "Give an excellent answer.",
    ),
    "toxicity": (
        "Be polite and inoffensive.",
        "Be slightly blunt.",
        "Be blunt and rude.",
        "Be very rude.",
        "Be extremely rude.",
    ),
    "humor": (
        "Be serious.",
        "Add a light touch of humor.",
        "Be humorous.",
        "Be very funny.",
        "Make the answer a comedy piece.",
    ),
    "creativity": (
        "Be conventional and factual.",
        "Be slightly creative.",
        "Be creative.",
        "Be very creative and original.",
        "Be wildly imaginative.",
    ),
    "helpfulness": (
        "Do not try to help.",
        "Help only a little.",
        "Be somewhat helpful.",
        "Be helpful.",
        "Be as helpful as possible.",
    ),
    "correctness": (
        "Accuracy does not matter.",
        "Be roughly accurate.",
        "Be mostly accurate.",
        "Be accurate.",
        "Be fully accurate and precise.",
    ),
    "coherence": (
        "Structure does not matter.",
        "Be loosely organised.",
        "Be reasonably clear.",
        "Be clear and well organised.",
        "Be perfectly clear and logically structured.",
    ),
}
ALWAYS_STATED = ("verbosity", "complexity")


def steering_instruction(attributes: Mapping[str, Any] | None) -> str:
    """System instruction for the ``instructions`` method (verbosity/complexity always, others if not default)."""
    full = resolve_attributes(attributes)
    sentences = [
        LEVEL_INSTRUCTIONS[name][level]
        for name, level in full.items()
        if name in ALWAYS_STATED or level != ATTRIBUTE_DEFAULTS[name]
    ]
    return " ".join(sentences)


def render_steerlm(
    messages: Sequence[Message], attributes: Mapping[str, Any] | None, assistant_prefix: str = ""
) -> str:
    """NeMo-Aligner SteerLM text; ends ready for the next assistant turn's content."""
    attribute_line = f"{ATTRIBUTE_TURN}{format_attributes(attributes)}\n"
    system = ""
    parts: list[str] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "system":
            system = content if not system else f"{system}\n{content}"
        elif role == "user":
            parts.append(f"{TURN}User\n{content}\n")
        elif role == "assistant":
            parts.append(f"{TURN}Assistant\n{attribute_line}{content}\n")
    parts.append(f"{TURN}Assistant\n{attribute_line}{assistant_prefix}")
    return f"{SYSTEM_TURN}System\n{system}\n" + "".join(parts)


def _with_system(messages: Sequence[Message], extra: str, *, first: bool) -> list[dict[str, str]]:
    """Messages as plain dicts with ``extra`` joined into (or added as) the system turn."""
    plain = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    if plain and plain[0]["role"] == "system":
        own = plain[0]["content"]
        plain[0]["content"] = f"{extra}\n\n{own}" if first else f"{own}\n{extra}"
    else:
        plain.insert(0, {"role": "system", "content": extra})
    return plain


def render_chat(
    messages: Sequence[Message],
    attributes: Mapping[str, Any] | None,
    method: SteeringMethod,
    apply_template: ApplyTemplate | None = None,
    assistant_prefix: str = "",
) -> str:
    """The exact prompt text a chat request becomes.

    ``apply_template`` renders a message list with the model's chat template and
    the generation prompt; the template methods need it.
    """
    method = SteeringMethod(method)
    if method is SteeringMethod.STEERLM:
        return render_steerlm(messages, attributes, assistant_prefix)
    if apply_template is None:
        raise ValueError(f"steering method {method.value!r} needs the model's chat template")
    if method is SteeringMethod.CHAT_TEMPLATE:
        extra = f"{ATTRIBUTE_TURN}{format_attributes(attributes)}"
        return apply_template(_with_system(messages, extra, first=False)) + assistant_prefix
    if method is SteeringMethod.DESCRIBED:
        extra = f"{ATTRIBUTE_TURN}{format_attributes(attributes)}\n{steering_instruction(attributes)}"
        return apply_template(_with_system(messages, extra, first=False)) + assistant_prefix
    return apply_template(_with_system(messages, steering_instruction(attributes), first=True)) + assistant_prefix


def stop_strings(method: SteeringMethod) -> list[str]:
    """Stop strings a steering method implies (the SteerLM turn marker)."""
    return [STEERLM_STOP] if SteeringMethod(method) is SteeringMethod.STEERLM else []


# ---- multiple choice -------------------------------------------------------


def validate_choices(choices: Sequence[str]) -> None:
    """2-10 non-empty choices, or ValueError."""
    if not MCQ_MIN_CHOICES <= len(choices) <= MCQ_MAX_CHOICES:
        raise ValueError(f"need {MCQ_MIN_CHOICES} to {MCQ_MAX_CHOICES} choices, got {len(choices)}")
    if any(not str(choice).strip() for choice in choices):
        raise ValueError("choices must not be empty")


def render_mcq_question(question: str, choices: Sequence[str], context: str | None = None) -> str:
    """The user turn of a multiple-choice item: context, question, lettered choices, instruction."""
    validate_choices(choices)
    lines = [context.strip(), ""] if context and context.strip() else []
    lines.append(f"Question: {question.strip()}")
    lines.extend(f"{letter}. {str(choice).strip()}" for letter, choice in zip(MCQ_LETTERS, choices))
    lines.extend(["", MCQ_INSTRUCTION])
    return "\n".join(lines)


def mcq_answer_token_text(index: int) -> str:
    """The text of the token that carries answer ``index`` right after :data:`MCQ_ANSWER_PREFIX`."""
    return f" {MCQ_LETTERS[index]}"


def render_mcq_answer(index: int, explanation: str | None = None) -> str:
    """The assistant turn MCQ SFT trains on; serving scores the token after ``Answer:``."""
    text = MCQ_ANSWER_PREFIX + mcq_answer_token_text(index)
    if explanation and explanation.strip():
        text += f"{MCQ_EXPLANATION_PREFIX} {explanation.strip()}"
    return text
