"""What the transformers and llama.cpp engines share: every model call in one worker thread.

Neither transformers' forwards nor llama.cpp's ``Llama`` may run concurrently with
themselves, and both block, so both engines hand every call to one dedicated thread
and keep the event loop free. This base owns what follows from that, once: the
lifecycle (new -> loading -> ready -> (failed) -> closed), request validation, the
``max_waiting`` guard (EngineOverloaded, 429), the per-request queue a stream reads
its deltas from, aborts by request id, seeds and choice sampling state, and exact
next-token log-probabilities. A subclass says how to load, feed and unload its model::

    class MyEngine(ThreadedEngine[PendingRequest]):
        name, thread_name = "mine", "mine-engine"
        def _load(self) -> None: ...                          # worker thread
        def _submit(self, request) -> PendingRequest: ...     # event loop: hand it to the worker
        ...                                                   # _unload, _release, _cancel, _logprobs
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Generic, TypeVar

import torch

from steerserve.server.engines.base import (
    ContextLengthExceeded, Engine, EngineConfig, EngineError, EngineNotReady, EngineOverloaded, EngineRequest,
    GenerationDelta, InvalidRequest, SamplingOptions,
)
from steerserve.server.engines.hf_scheduler import Sequence, TextTracker

logger = logging.getLogger(__name__)

_NOT_READY = {
    "new": "the engine is not started",
    "loading": "the engine is still loading",
    "failed": "the engine's scheduler failed",
    "closed": "the engine was shut down",
}
_CONTEXT_IDS = 5  # prompt ids decoded with the output, so a first token's leading space survives


@dataclasses.dataclass(eq=False)
class PendingRequest:
    """Event-loop side of one request: its stream reads deltas (or one error) from ``queue``.

    Made on the event loop (it captures the running loop), so the worker thread can
    hand deltas over with :meth:`put_threadsafe`.
    """

    request: EngineRequest
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    loop: asyncio.AbstractEventLoop = dataclasses.field(default_factory=asyncio.get_running_loop)
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)

    def put_threadsafe(self, item: GenerationDelta | BaseException) -> None:
        """Hand-over from the worker thread (asyncio queues are not thread-safe)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


_P = TypeVar("_P", bound=PendingRequest)


def generation_failed(exc: BaseException) -> EngineError:
    """The error a stream raises when a model call failed, chained to the cause for the log."""
    error = EngineError(f"generation failed: {exc!r}")
    error.__cause__ = exc
    return error


class ThreadedEngine(Engine, Generic[_P]):
    """An engine whose model runs in one worker thread, fed by the event loop.

    ``_P`` is the subclass's record of a request (a :class:`PendingRequest` with its own fields).
    """

    thread_name: ClassVar[str]
    """Prefix of the worker thread's name (seen in py-spy and thread dumps)."""
    cancel_queued_on_shutdown: ClassVar[bool] = False
    """Whether shutdown cancels worker calls not yet started instead of letting them run."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._state = "new"  # new -> loading -> ready -> (failed) -> closed
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._active: dict[str, list[_P]] = {}
        """Request id -> its requests still streaming (ids need not be unique)."""
        self._seeds = random.Random(config.seed)  # unseeded requests: reproducible per engine run
        self._max_waiting = int(config.extra.get("max_waiting", 1024))

    # ------------------------------------------------------------------ subclass hooks

    @abc.abstractmethod
    def _load(self) -> None:
        """Worker thread: load the tokenizer, weights and ``_eos_ids``."""

    @abc.abstractmethod
    def _unload(self) -> None:
        """Drop the weights; called once the worker thread is idle for good (may run twice)."""

    def _on_ready(self) -> None:
        """Event loop, once loaded: start whatever feeds the worker (the default feeds per request)."""

    async def _stop_feeding(self) -> None:
        """Shutdown, before the requests are cancelled: stop what feeds the worker."""

    @abc.abstractmethod
    def _submit(self, request: EngineRequest) -> _P:
        """Event loop: queue ``request`` for the worker; its deltas arrive on the returned queue."""

    @abc.abstractmethod
    def _release(self, pending: _P) -> None:
        """The stream ended (done, closed or cancelled): stop its work and unregister it."""

    @abc.abstractmethod
    def _cancel(self, pending: _P) -> None:
        """End ``pending`` early (abort, shutdown): its open choices finish with "abort"."""

    @abc.abstractmethod
    def _logprobs(self, prompt_token_ids: list[int], candidates: list[int]) -> list[float]:
        """Worker thread: log-softmax of ``candidates`` as the next token over the full vocabulary."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._state == "ready":
            return
        if self._state != "new":
            raise EngineNotReady(f"the engine cannot restart ({self._state})")
        self._state = "loading"
        executor = self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.thread_name)
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._load)
        except BaseException:
            executor.shutdown(wait=False)
            if self._state == "loading":
                self._executor, self._state = None, "new"
            raise
        if self._state != "loading":  # shut down while loading
            self._unload()
            raise EngineNotReady(self._not_ready_message())
        self._on_ready()
        self._state = "ready"

    async def shutdown(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        await self._stop_feeding()
        for pending in self._all_requests():
            self._cancel(pending)
        if self._executor is not None:  # waits for the call in flight before the weights are dropped
            await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=self.cancel_queued_on_shutdown)
        self._executor = None
        self._unload()

    def _not_ready_message(self) -> str:
        """Why requests are refused now (the EngineNotReady message clients see)."""
        return _NOT_READY[self._state]

    def _check_ready(self) -> None:
        if self._state != "ready":
            raise EngineNotReady(self._not_ready_message())

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
        # Checked here, at the first __anext__, not in generate(): the engine may have shut
        # down since, and the queue's length is what it is when the request joins it.
        self._check_ready()
        if self.waiting >= self._max_waiting:
            raise EngineOverloaded(f"{self.waiting} requests are already waiting")
        pending = self._submit(request)
        self._active.setdefault(request.request_id, []).append(pending)
        try:
            open_choices = request.options.n
            while open_choices:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    raise item
                open_choices -= item.finish_reason is not None
                yield item
        finally:  # consumer gone (aclose, cancellation) or done: the worker stops at its next step
            self._release(pending)

    def _unregister(self, pending: _P) -> None:
        same_id = self._active.get(pending.request.request_id, [])
        if pending in same_id:
            same_id.remove(pending)
            if not same_id:
                del self._active[pending.request.request_id]

    def _all_requests(self) -> list[_P]:
        """A snapshot: ending a request may unregister it."""
        return [pending for same_id in self._active.values() for pending in same_id]

    async def abort(self, request_id: str) -> None:
        for pending in list(self._active.get(request_id, [])):
            self._cancel(pending)

    def _seed(self, options: SamplingOptions) -> int:
        """The request's seed, or the next of the engine's own (so an engine run reproduces)."""
        return options.seed if options.seed is not None else self._seeds.getrandbits(63)

    def _sequence(self, request: EngineRequest, index: int, seed: int) -> Sequence:
        """Choice ``index``: its own generator seeded ``seed + index``, so choices differ yet reproduce."""
        opts = request.options
        return Sequence(
            index=index, prompt_ids=list(request.prompt_token_ids), options=opts,
            generator=torch.Generator().manual_seed((seed + index) % 2**63),
            tracker=TextTracker(self._tokenizer, request.prompt_token_ids[-_CONTEXT_IDS:], opts.stop),
            eos_ids=self._eos_ids, max_model_len=self.config.max_model_len,
        )

    def _report_step(self, batch_size: int) -> None:
        """Tell the metrics layer a decode step ran; a metrics bug must not fail the requests."""
        if self.on_step is None:
            return
        try:
            self.on_step(batch_size)
        except Exception:
            logger.exception("on_step callback failed")

    async def next_token_logprobs(self, prompt_token_ids: list[int], candidates: list[int]) -> list[float]:
        self._check_ready()
        if not prompt_token_ids:
            raise InvalidRequest("the prompt has no tokens")
        if len(prompt_token_ids) > self.config.max_model_len:
            raise ContextLengthExceeded(len(prompt_token_ids), 0, self.config.max_model_len)
        loop = asyncio.get_running_loop()  # same worker thread: never overlaps another model call
        return await loop.run_in_executor(self._executor, self._logprobs, list(prompt_token_ids), list(candidates))
