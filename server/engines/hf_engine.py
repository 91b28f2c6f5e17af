"""The reference engine: transformers models on CPU (or bitsandbytes int8/nf4), batched continuously.

    engine = TransformersEngine(EngineConfig(model="/ckpt", precision=Precision.BF16)); await engine.start()

One asyncio task schedules; every model forward runs in one dedicated worker thread,
so forwards never overlap and the event loop never blocks. Each scheduler iteration
takes waiting requests into the batch (up to ``max_num_seqs`` sequences), prefills
them, then decodes one token for every running sequence in one batched forward.
transformers' own continuous batching (``generation.continuous_batching``) was not
used: it samples with the global RNG (no per-request seed) and fixes ``do_sample``
and ``num_return_sequences`` per manager, not per request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import gc
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from steerserve.precision import Precision
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
)
from steerserve.server.engines.hf_scheduler import (
    DecodeBatch,
    Sequence,
    TextTracker,
    enable_padded_attention,
    model_weight_bytes,
)

logger = logging.getLogger(__name__)

_NOT_READY = {
    "new": "the engine is not started",
    "loading": "the engine is still loading",
    "failed": "the engine's scheduler failed",
    "closed": "the engine was shut down",
}
_CONTEXT_IDS = 5  # prompt ids decoded with the output, so a first token's leading space survives


@dataclasses.dataclass(eq=False)
class _Request:
    """Event-loop side of one request: its choices and the queue its stream reads."""

    request: EngineRequest
    seqs: list[Sequence]
    arrival: float
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)


def load_kwargs(config: EngineConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments for the configured precision."""
    precision = config.precision
    kwargs: dict[str, Any] = {"dtype": precision.torch_dtype_name}
    if "attn_implementation" in config.extra:
        kwargs["attn_implementation"] = config.extra["attn_implementation"]
    if precision.is_float:
        return kwargs
    if precision not in (Precision.INT8, Precision.NF4):
        raise EngineError(f"the transformers engine cannot serve {precision.value} checkpoints")
    try:
        import bitsandbytes  # noqa: F401  (only checks that it is installed)
    except ImportError:
        raise EngineError(f"precision {precision.value} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if precision is Precision.INT8:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
        _warn_once("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
    else:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    return kwargs | {"quantization_config": quantization, "device_map": config.extra.get("device_map", "cpu")}


class _OnceFilter(logging.Filter):
    """Lets the first record starting with ``prefix`` through, drops its repeats."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _warn_once(logger_name: str, prefix: str) -> None:
    """bitsandbytes int8 logs its bf16->fp16 cast on every forward: keep the first one only."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, _OnceFilter) and f.prefix == prefix for f in target.filters):
        target.addFilter(_OnceFilter(prefix))


class TransformersEngine(Engine):
    """Continuous batching over a transformers ``AutoModelForCausalLM``."""

    name = "transformers"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._state = "new"  # new -> loading -> ready -> (failed) -> closed
        self._model: Any = None
        self._tokenizer: Any = None
        self._batch: DecodeBatch | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._active: dict[str, list[_Request]] = {}
        self._seeds = random.Random(config.seed)  # unseeded requests: reproducible per engine run
        self._max_waiting = int(config.extra.get("max_waiting", 1024))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._state == "ready":
            return
        if self._state != "new":
            raise EngineNotReady(f"the engine cannot restart ({self._state})")
        self._state = "loading"
        executor = self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf-engine")
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._load)
        except BaseException:
            executor.shutdown(wait=False)
            if self._state == "loading":
                self._executor, self._state = None, "new"
            raise
        if self._state != "loading":  # shut down while loading
            self._model = self._tokenizer = self._batch = None
            raise EngineNotReady(_NOT_READY["closed"])
        self._task = asyncio.create_task(self._run(), name="hf-engine-scheduler")
        self._task.add_done_callback(self._on_scheduler_exit)
        self._state = "ready"

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        self._tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        model = AutoModelForCausalLM.from_pretrained(self.config.model, **load_kwargs(self.config)).eval()
        padded = enable_padded_attention(model)
        eos = {self._tokenizer.eos_token_id, model.config.eos_token_id, model.generation_config.eos_token_id}
        flat = {i for e in eos for i in (e if isinstance(e, (list, tuple)) else [e])}
        self._eos_ids = frozenset(i for i in flat if i is not None)
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        self._model, self._batch = model, DecodeBatch(model, padded_attention=padded, pad_token_id=pad)
        logger.info(
            "loaded %s (%s, %s attention) in %.1f s", self.config.model, self.config.precision.value,
            "padded" if padded else model.config._attn_implementation, time.monotonic() - started,
        )

    async def shutdown(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for req in self._all_requests():
            self._finish(req, "abort")
        self._waiting.clear()
        if self._executor is not None:  # waits for a forward still in flight before dropping the model
            await asyncio.to_thread(self._executor.shutdown, True)
        self._model = self._tokenizer = self._batch = self._executor = None
        gc.collect()

    def _check_ready(self) -> None:
        if self._state != "ready":
            raise EngineNotReady(_NOT_READY[self._state])

    # ------------------------------------------------------------------ requests

    def generate(self, request: EngineRequest) -> AsyncIterator[GenerationDelta]:
        self._check_ready()
        opts, prompt = request.options, request.prompt_token_ids
        if not prompt:
            raise InvalidRequest("the prompt has no tokens")
        if opts.n < 1 or opts.max_tokens < 1:
            raise InvalidRequest("n and max_tokens must be at least 1")
        if len(prompt) >= self.config.max_model_len:
            raise ContextLengthExceeded(len(prompt), opts.max_tokens, self.config.max_model_len)
        return self._stream(request)

    async def _stream(self, request: EngineRequest) -> AsyncIterator[GenerationDelta]:
        req = self._enqueue(request)
        try:
            open_choices = len(req.seqs)
            while open_choices:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    open_choices -= 1
                yield item
        finally:  # consumer gone (aclose, cancellation) or done: free the slot at the next step
            self._release(req)

    def _enqueue(self, request: EngineRequest) -> _Request:
        self._check_ready()
        if len(self._waiting) >= self._max_waiting:
            raise EngineOverloaded(f"{len(self._waiting)} requests are already waiting")
        opts = request.options
        seed = opts.seed if opts.seed is not None else self._seeds.getrandbits(63)
        context = request.prompt_token_ids[-_CONTEXT_IDS:]
        seqs = [
            Sequence(
                index=i, prompt_ids=list(request.prompt_token_ids), options=opts,
                generator=torch.Generator().manual_seed((seed + i) % 2**63),
                tracker=TextTracker(self._tokenizer, context, opts.stop), eos_ids=self._eos_ids,
                max_model_len=self.config.max_model_len,
            )
            for i in range(opts.n)
        ]
        req = _Request(request, seqs, time.monotonic())
        for seq in seqs:
            seq.owner = req
        self._waiting.append(req)
        self._active.setdefault(request.request_id, []).append(req)
        self._wakeup.set()
        return req

    def _all_requests(self) -> list[_Request]:
        """A snapshot: ending a request removes it from ``_active``."""
        return [req for same_id in self._active.values() for req in same_id]

    def _release(self, req: _Request) -> None:
        for seq in req.seqs:
            if not seq.closed:
                seq.aborted = seq.closed = True
        self._forget(req)

    def _forget(self, req: _Request) -> None:
        if req in self._waiting:
            self._waiting.remove(req)
        same_id = self._active.get(req.request.request_id, [])
        if req in same_id:
            same_id.remove(req)
            if not same_id:
                del self._active[req.request.request_id]
        self._wakeup.set()  # the scheduler drops aborted rows at its next step

    def _finish(self, req: _Request, reason: str) -> None:
        """End every open choice of ``req`` with ``reason`` (the stream then ends by itself)."""
        for seq in req.seqs:
            if not seq.closed:
                seq.aborted = seq.closed = True
                queued, seq.queued_s = seq.queued_s, None
                req.queue.put_nowait(GenerationDelta(seq.index, "", 0, reason, queued_s=queued))
        self._forget(req)

    def _fail(self, req: _Request, error: BaseException) -> None:
        for seq in req.seqs:
            seq.aborted = seq.closed = True
        req.queue.put_nowait(error)
        self._forget(req)

    async def abort(self, request_id: str) -> None:
        for req in list(self._active.get(request_id, [])):
            self._finish(req, "abort")

    async def next_token_logprobs(self, prompt_token_ids: list[int], candidates: list[int]) -> list[float]:
        self._check_ready()
        if not prompt_token_ids:
            raise InvalidRequest("the prompt has no tokens")
        if len(prompt_token_ids) > self.config.max_model_len:
            raise ContextLengthExceeded(len(prompt_token_ids), 0, self.config.max_model_len)
        loop = asyncio.get_running_loop()  # same worker thread: never overlaps a decode step
        return await loop.run_in_executor(self._executor, self._logprobs, list(prompt_token_ids), list(candidates))

    def _logprobs(self, prompt_token_ids: list[int], candidates: list[int]) -> list[float]:
        with torch.inference_mode():
            ids = torch.tensor([prompt_token_ids], device=self._batch.device)
            logits = self._model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
            logprobs = logits.float().log_softmax(-1)
        if any(not 0 <= c < logprobs.shape[0] for c in candidates):
            raise InvalidRequest(f"candidate ids must be in [0, {logprobs.shape[0]})")
        return logprobs[candidates].tolist()

    def weight_bytes(self) -> int:
        self._check_ready()
        return model_weight_bytes(self._model)

    @property
    def running(self) -> int:
        return len(self._batch.rows) if self._batch is not None else 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ scheduler

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting and not self._batch.rows:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._iteration(loop)
            except Exception as exc:  # a failed forward must not leave streams hanging
                logger.exception("transformers engine step failed; failing every request")
                self._fail_everything(exc)

    async def _iteration(self, loop: asyncio.AbstractEventLoop) -> None:
        newcomers = self._take_waiting()
        if newcomers:
            self._deliver(await loop.run_in_executor(self._executor, self._admit_step, newcomers))
        if self._batch.rows:
            advanced = await loop.run_in_executor(self._executor, self._decode_step)
            self._deliver(advanced)
            if advanced and self.on_step is not None:
                try:
                    self.on_step(len(advanced))
                except Exception:  # a metrics bug must not fail the requests
                    logger.exception("on_step callback failed")

    def _take_waiting(self) -> list[Sequence]:
        """FIFO admission up to ``max_num_seqs`` sequences; an oversized request runs alone."""
        capacity = self.config.max_num_seqs - len(self._batch.rows)
        taken: list[Sequence] = []
        while self._waiting:
            req = self._waiting[0]
            if len(req.seqs) > capacity and (taken or self._batch.rows):
                break
            self._waiting.popleft()
            capacity -= len(req.seqs)
            queued = time.monotonic() - req.arrival
            for seq in req.seqs:
                seq.queued_s = queued
            taken.extend(req.seqs)
        return taken

    def _admit_step(self, newcomers: list[Sequence]) -> list[Sequence]:
        with torch.inference_mode():
            self._batch.drop_done()
            return self._batch.admit(newcomers)

    def _decode_step(self) -> list[Sequence]:
        with torch.inference_mode():
            self._batch.drop_done()
            return self._batch.decode()

    def _deliver(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            text, count, reason = seq.take_delta()
            if seq.closed:  # aborted or abandoned while the step ran
                continue
            queued, seq.queued_s = seq.queued_s, None
            seq.closed = reason is not None
            seq.owner.queue.put_nowait(GenerationDelta(seq.index, text, count, reason, queued_s=queued))

    def _fail_everything(self, exc: BaseException) -> None:
        for req in self._all_requests():
            error = EngineError(f"generation failed: {exc!r}")
            error.__cause__ = exc
            self._fail(req, error)
        self._waiting.clear()
        if self._batch is not None:  # its cache may be half-updated
            self._batch.reset()

    def _on_scheduler_exit(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._state != "ready":
            return
        exc = task.exception() or RuntimeError("scheduler stopped")
        logger.error("transformers engine scheduler died: %r", exc)
        self._state = "failed"  # shutdown() still frees the model
        self._fail_everything(exc)
