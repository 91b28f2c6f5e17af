"""The narrow interface every inference engine implements.

Engines know token ids, sampling options and streaming; they know nothing of
HTTP, attributes or prompt formats (the serving layer renders and tokenizes).
Pick one by name from :data:`steerserve.server.engines.ENGINES`::

    engine = ENGINES["transformers"](EngineConfig(model="/ckpt", precision=Precision.BF16))
    await engine.start()
    async for delta in engine.generate(EngineRequest("r1", ids, SamplingOptions(max_tokens=16))):
        ...
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from steerserve.precision import Precision

if TYPE_CHECKING:
    import torch

    from steerserve.verbosity_guidance import EndGuide


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How to load one variant into an engine."""

    model: str
    """Local checkpoint directory (config.json + weights + tokenizer)."""
    precision: Precision = Precision.BF16
    max_model_len: int = 2048
    """Prompt + generated tokens per sequence; longer prompts are rejected before the engine."""
    max_num_seqs: int = 16
    """Most sequences decoded together in one step (the batch)."""
    kv_cache_gib: float = 1.0
    """KV-cache space for engines that preallocate it (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    enforce_eager: bool = True
    """vLLM: skip graph compilation (starts in ~25 s instead of ~130 s on CPU). Engines built in code start
    eager; ``steerserve serve`` compiles unless told ``--enforce-eager`` (ServerSettings.enforce_eager)."""
    seed: int = 0
    tensor_parallel_size: int = 1
    """vLLM: GPUs each layer is split across (CUDA only)."""
    pipeline_parallel_size: int = 1
    """vLLM: GPUs the layers are staged across (CUDA only)."""
    reading_level_guidance: float = 0.0
    """The variant's reading-level guidance strength: vLLM installs its reading-level logits processor when > 0."""
    adapter: str | None = None
    """A PEFT LoRA adapter kept unmerged beside the loaded weights (transformers engine): for a bitsandbytes
    base, where a merge would re-quantize the sum and round most of the adapter's update away."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Engine-specific arguments passed through unchanged (e.g. vLLM engine args)."""


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """A PEFT LoRA adapter to apply per request on an engine's base weights."""

    name: str
    """Unique per engine (the adapter's model id)."""
    path: str
    """Directory with adapter_config.json and the adapter weights."""
    rank: int


GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily, as in vLLM (its ``_SAMPLING_EPS``): dividing logits by a
denormal temperature would overflow. Every engine and the request path use this one threshold."""


@dataclasses.dataclass(frozen=True, eq=False)
class LogitBias:
    """Logits added to chosen tokens before penalties and sampling (OpenAI's ``logit_bias``, vLLM's order).

    Built once and shared: the reading-level bias of a complexity level covers most of the vocabulary, so its
    tensors and dict are made on first use and reused by every request at that level.
    """

    ids: tuple[int, ...]
    values: tuple[float, ...]
    reading_level: tuple[int, float] | None = None
    """(complexity level, strength) where this is the reading-level guide's bias: an engine holding the guide
    itself (vLLM's, :mod:`~steerserve.server.engines.vllm_reading_level`) applies it from these two numbers."""

    @classmethod
    def of(cls, bias: Mapping[int, float], reading_level: tuple[int, float] | None = None) -> LogitBias:
        return cls(tuple(int(token) for token in bias), tuple(float(value) for value in bias.values()),
                   reading_level)

    def merged(self, other: LogitBias | None) -> LogitBias:
        """Both biases summed per token (a caller's ``logit_bias`` on top of the slider's)."""
        if other is None:
            return self
        total = dict(zip(self.ids, self.values))
        for token, value in zip(other.ids, other.values):
            total[token] = total.get(token, 0.0) + value
        return LogitBias.of(total)

    @functools.cached_property
    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.ids, self.values))

    @functools.cached_property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, float32 values), for adding to a row of logits."""
        import torch

        return torch.tensor(self.ids, dtype=torch.long), torch.tensor(self.values, dtype=torch.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class EndPush:
    """The verbosity slider's push (:mod:`steerserve.verbosity_guidance`): :attr:`logits` added to the guide's
    end-of-turn tokens at the steps where the answer so far ends a sentence. vLLM's processor receives the level
    and strength alone and holds its own guide."""

    guide: EndGuide
    verbosity: int
    strength: float

    @functools.cached_property
    def logits(self) -> float:
        from steerserve.verbosity_guidance import push

        return push(self.verbosity, self.strength)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """OpenAI sampling fields, already validated."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0
    """Tokens generated before the end-of-sequence token may be (vLLM's meaning: it is masked until then)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: LogitBias | None = None
    """The caller's ``logit_bias``."""
    guidance: LogitBias | None = None
    """The complexity slider's reading-level bias (None at level 4 or with guidance off)."""
    end_push: EndPush | None = None
    """The verbosity slider's push on the end-of-turn token at sentence ends (None at level 4 or when off)."""
    loop_repeats: int = 0
    """The loop guard (:mod:`steerserve.loop_guard`): the answer ends once its tail repeats a stretch of tokens
    this many times in a row; 0: off. Every engine leaves an ``ignore_eos`` request alone."""

    @functools.cached_property
    def total_logit_bias(self) -> LogitBias | None:
        """Everything added to the logits: the slider's bias and the caller's, summed per token."""
        return self.guidance.merged(self.logit_bias) if self.guidance is not None else self.logit_bias

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (vLLM's semantics; every engine applies them before sampling)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits change before the argmax: a logit bias or any penalty."""
        return (self.penalized or self.min_tokens > 0 or self.end_push is not None or self.loop_repeats > 0
                or bool(self.total_logit_bias and self.total_logit_bias.ids))


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    options: SamplingOptions


@dataclasses.dataclass
class GenerationDelta:
    """New output of one choice since its previous delta."""

    index: int
    """Which of the ``n`` choices this belongs to."""
    text: str
    """Newly decoded text (stop strings already removed)."""
    token_count: int
    """Tokens generated in this delta."""
    finish_reason: str | None = None
    """None while running; then "stop", "length" or "abort"."""
    queued_s: float | None = None
    """On a choice's first delta: seconds from arrival until the engine scheduled it, if known."""


class EngineError(Exception):
    """Base of the typed errors engines raise; server.errors maps them to HTTP."""


class ContextLengthExceeded(EngineError):
    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        super().__init__(
            f"this model's maximum context length is {limit} tokens; the request has "
            f"{prompt_tokens} prompt tokens and asks for {max_tokens} more"
        )
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit


class InvalidRequest(EngineError, ValueError):
    """Options or inputs the engine cannot run (the server validates first; this is the backstop)."""


class EngineNotReady(EngineError):
    """The engine is still loading, or has shut down."""


class EngineOverloaded(EngineError):
    """The engine's queue is full; try again later."""


class AdaptersUnsupported(EngineError):
    """This engine cannot apply an adapter per request (the message says why in one line)."""


class Engine(abc.ABC):
    """One loaded model. Concurrent ``generate`` calls must be batched by the engine."""

    name: ClassVar[str]

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.on_step: Callable[[int], None] | None = None
        """Set by the metrics layer; engines call it with the batch size of every decode step."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load weights; return once requests can be served."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Abort what runs and free the weights (and any engine processes)."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[GenerationDelta]:
        """Stream deltas until every choice has a finish_reason.

        Errors (EngineNotReady, ContextLengthExceeded, InvalidRequest) surface on the first
        ``__anext__``. A delta's text may be empty (a token held back, e.g. a partial stop
        string). Closing the iterator early (client gone) must free the request's batch slot.
        """

    @abc.abstractmethod
    async def next_token_logprobs(self, prompt_token_ids: list[int], candidates: list[int]) -> list[float]:
        """Log-probabilities of ``candidates`` as the next token, from the full-vocabulary softmax.

        MCQ scores choices with these, so they must be exact, not sampled.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running request; its stream ends with finish_reason "abort"."""

    @abc.abstractmethod
    def weight_bytes(self) -> int:
        """Bytes of the weights resident in memory (not the file size)."""

    def adapter_engine(self, adapter: AdapterConfig) -> Engine:
        """An engine serving ``adapter`` per request on these weights; call before :meth:`start`.

        Engines without per-request adapters raise :class:`AdaptersUnsupported`; the server
        then serves the merged checkpoint on an engine of its own.
        """
        raise AdaptersUnsupported(f"the {self.name} engine applies no LoRA adapters per request")

    @property
    def kv_cache_usage(self) -> float | None:
        """Fraction (0-1) of the preallocated KV cache in use; None for engines without one."""
        return None

    @property
    def running(self) -> int:
        """Sequences being decoded now (gauge)."""
        return 0

    @property
    def waiting(self) -> int:
        """Requests accepted but not yet scheduled (gauge)."""
        return 0
