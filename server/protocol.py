"""Every wire type of the HTTP API, and nothing else.

OpenAI's names and field order first; steerserve's own extensions (attribute
sliders, MCQ, render) are fenced off below. The official ``openai`` SDK sends
the extensions through ``extra_body={"attributes": {...}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from steerserve.attributes import ATTRIBUTE_NAMES, InvalidAttribute, validate_attributes
from steerserve.loop_guard import LoopCopies


def _check_attributes(value: dict[str, Any] | None) -> dict[str, int] | None:
    return None if value is None else validate_attributes(value)


# Sliders as sent: a partial mapping, validated (names, 0-4 integers) but not yet defaulted.
Attributes = Annotated[dict[str, Any] | None, AfterValidator(_check_attributes)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer SDKs keep working.
    model_config = ConfigDict(extra="ignore")


class _SteeredRequest(_Request):
    """A request that takes sliders: they go in ``attributes``, and one sent beside the other fields is refused.

    Ignored with the other unknown fields, ``"verbosity": 4`` (or OpenAI's own ``verbosity: "low"``) would give an
    unsteered answer with no sign of it; refused, the caller learns where the slider goes.
    """

    @model_validator(mode="before")
    @classmethod
    def _sliders_in_attributes(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ATTRIBUTE_NAMES:
                if name in data:
                    example = f'{{"attributes": {{"{name}": 4}}}}'
                    raise InvalidAttribute(f'{name}: sliders go in "attributes", 0-4 each: {example} '
                                           f'(openai SDK: extra_body={example})', name)
        return data


class StreamOptions(_Request):
    include_usage: bool = False


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """Content as plain text (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _SamplingFields(_SteeredRequest):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    """Subtracted once from the logit of every token already generated (OpenAI's definition)."""
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    """Subtracted from a token's logit per time it was generated (OpenAI's definition)."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> -100..100, added to that token's logit before sampling (OpenAI's definition;
    ids are checked against the model's vocabulary when the request is prepared)."""
    # --- steerserve extensions -------------------------------------------------
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10.0)
    """vLLM's and transformers' multiplicative penalty on tokens of the prompt or the output: positive logits
    are divided by it, negative ones multiplied; 1 is off. Small models loop under greedy decoding without it.
    At least 0.01: a penalty near zero divides logits into infinities that no sampler can draw from."""
    attributes: Attributes = None
    """Steering sliders, 0-4 each; missing ones take the SteerLM defaults."""
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    """vLLM's: tokens generated before the end-of-sequence token may come (at most max_tokens)."""
    loop_guard: LoopCopies | None = None
    """Copies in a row of a stretch of tokens that end this answer, over the model's own (its card's
    ``loop_guard``); 0: let loops run to max_tokens."""

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids; got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{token}] must be from -100 to 100, got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatCompletionRequest(_SamplingFields):
    model: str
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must not be empty")
        if not any(m.role == "user" and m.text().strip() for m in value):
            raise ValueError("messages need at least one non-empty user message")
        return value


class CompletionRequest(_SamplingFields):
    model: str
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or a list of them")
        return value


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt: int, completion: int) -> UsageInfo:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: None = None


def _now() -> int:
    return int(time.time())


# Extension fields every response ends with (after OpenAI's own):
#   attributes: the full attribute set that was applied (defaults filled in); None when nothing was steered
#   steering:   how the sliders reached the prompt (steerlm, chat-template, instructions, described)


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    # --- steerserve extensions -------------------------------------------------
    attributes: dict[str, int] | None = None
    steering: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    # --- steerserve extensions (first chunk only) ---------------------------------
    attributes: dict[str, int] | None = None
    steering: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    # --- steerserve extensions (streams: first chunk only) -------------------------
    attributes: dict[str, int] | None = None
    steering: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "steerserve"
    # --- steerserve extensions -------------------------------------------------
    root: str
    """Checkpoint directory the variant was loaded from."""
    precision: str
    engine: str
    steering: str
    """How sliders reach the prompt: steerlm, chat-template, instructions or described."""
    weight_bytes: int | None = None
    disk_bytes: int | None = None
    """Bytes of the checkpoint on disk, from its manifest's ``bytes`` (quantized variants have it)."""
    max_model_len: int
    ready: bool
    attributes: list[str] = Field(default_factory=lambda: list(ATTRIBUTE_NAMES))
    base: str | None = None
    """For a LoRA adapter: the model id it is applied to."""
    adapter: bool = False
    served_as: Literal["lora", "merged", "unmerged"] | None = None
    """For a LoRA adapter: applied per request on the base's engine, its merged checkpoint on an engine of its
    own, or (a quantized base on the transformers engine) the base's weights with the adapter kept unmerged."""
    served_as_reason: str | None = None
    """Why an adapter is not applied per request on its base's engine (one line)."""
    reading_level_guidance: float = 0.0
    """Logits per syllable the complexity slider pushes with at level 0 (0: the prompt alone steers it)."""
    verbosity_guidance: float = 0.0
    """Logits the verbosity slider pushes the end-of-turn token up by at level 0 (0: the prompt alone steers it)."""
    loop_guard: int = 0
    """Copies in a row of a stretch of tokens that end an answer (0: loops run to max_tokens)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- steerserve extensions: multiple choice ---------------------------------


class MCQItem(_Request):
    question: str = Field(min_length=1)
    choices: list[str] = Field(min_length=2, max_length=10)
    context: str | None = None

    @field_validator("choices")
    @classmethod
    def _check_choices(cls, value: list[str]) -> list[str]:
        if any(not c.strip() for c in value):
            raise ValueError("choices must not be empty strings")
        return value


class MCQRequest(_SteeredRequest):
    model: str
    question: str | None = Field(default=None, min_length=1)
    choices: list[str] | None = Field(default=None, min_length=2, max_length=10)
    context: str | None = None
    items: list[MCQItem] | None = Field(default=None, min_length=1, max_length=256)
    attributes: Attributes = None
    explain: bool = False
    explain_max_tokens: int = Field(default=128, ge=1, le=1024)

    @model_validator(mode="after")
    def _single_or_batch(self) -> MCQRequest:
        single = self.question is not None or self.choices is not None
        if single == (self.items is not None):
            raise ValueError("give either question + choices, or items, not both")
        if single:
            self.items = [MCQItem(question=self.question or "", choices=self.choices or [], context=self.context)]
        return self


class MCQResult(BaseModel):
    answer: str
    index: int
    probabilities: dict[str, float]
    explanation: str | None = None


class MCQResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("mcq"))
    object: Literal["mcq.result", "mcq.batch"] = "mcq.result"
    created: int = Field(default_factory=_now)
    model: str
    answer: str | None = None
    index: int | None = None
    probabilities: dict[str, float] | None = None
    explanation: str | None = None
    results: list[MCQResult] | None = None
    """Batch requests only: one result per item, in order."""
    usage: UsageInfo
    attributes: dict[str, int]
    steering: str | None = None


# ---- steerserve extensions: render ------------------------------------------


class RenderRequest(_SteeredRequest):
    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    attributes: Attributes = None

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> RenderRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either messages or prompt")
        return self


class RenderResponse(BaseModel):
    model: str
    prompt: str
    prompt_token_ids: list[int]
    num_tokens: int
    steering: str
    attributes: dict[str, int] | None
    stop: list[str]
