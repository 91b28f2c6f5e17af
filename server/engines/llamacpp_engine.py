"""GGUF variants (gguf-q8_0, gguf-q4_k_m) through llama-cpp-python, one sequence at a time.

    engine = LlamaCppEngine(EngineConfig(model="/variants/gguf-q4_k_m", precision=Precision.GGUF_Q4_K_M))

llama-cpp-python's ``Llama`` is not thread-safe and holds one sequence's KV cache, so
this engine does NOT batch: every call into llama.cpp runs in one worker thread, and
requests (and the ``n`` choices of one request) are served one after another in
arrival order; the rest wait (``waiting``). Sampling and stop strings reuse the
transformers engine's ``Sequence`` / ``sample_tokens`` / ``TextTracker`` on logits read
from llama.cpp, so seeds, temperature and top_p mean the same on both engines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import random
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from steerserve.server.engines.base import (
    ContextLengthExceeded, Engine, EngineConfig, EngineError, EngineNotReady, EngineOverloaded, EngineRequest,
    GenerationDelta, InvalidRequest,
)
from steerserve.server.engines.hf_scheduler import Sequence, TextTracker, sample_tokens

logger = logging.getLogger(__name__)

_CONTEXT_IDS = 5  # prompt ids decoded with the output, so a first token's leading space survives


@dataclasses.dataclass(eq=False)
class _Job:
    """One request: filled by the worker thread, drained by the stream through ``queue``."""

    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    arrival: float
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    abort_reason: str = "abort"

    def put(self, item: GenerationDelta | BaseException) -> None:
        """Thread-safe hand-over to the event loop."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class LlamaCppEngine(Engine):
    """One GGUF model in llama.cpp; requests run strictly one after another."""

    name = "llama.cpp"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._state = "new"
        self._llama: Any = None
        self._tokenizer: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._weight_bytes = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._jobs: dict[str, list[_Job]] = {}
        self._pending = 0  # submitted, not yet started (gauge)
        self._running = 0
        self._counts = threading.Lock()  # the gauges change on both threads
        self._seeds = random.Random(config.seed)
        self._max_waiting = int(config.extra.get("max_waiting", 1024))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._state == "ready":
            return
        if self._state != "new":
            raise EngineNotReady(f"the engine cannot restart ({self._state})")
        self._state = "loading"
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamacpp-engine")
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor, self._state = None, "new"
            raise
        self._state = "ready"

    def _load(self) -> None:
        from transformers import AutoTokenizer

        from steerserve.training.quantize.gguf import find_gguf, load_llama

        started = time.monotonic()
        path = find_gguf(self.config.model)
        self._tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        self._llama = load_llama(path.parent, n_ctx=self.config.max_model_len, seed=self.config.seed)
        if self._llama.n_vocab() < len(self._tokenizer):
            raise EngineError(f"{path} has {self._llama.n_vocab()} tokens but the tokenizer {len(self._tokenizer)}")
        eos = {self._tokenizer.eos_token_id, self._llama.token_eos()}
        self._eos_ids = frozenset(i for i in eos if i is not None and i >= 0)
        self._weight_bytes = gguf_tensor_bytes(path)
        logger.info("loaded %s (%s) in llama.cpp in %.1f s", path, self.config.precision.value,
                    time.monotonic() - started)

    async def shutdown(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        for jobs in list(self._jobs.values()):
            for job in jobs:
                job.cancelled.set()
        if self._executor is not None:  # lets the running job see its cancel flag, then frees the model
            await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        if self._llama is not None:
            self._llama.close()
        self._llama = self._tokenizer = self._executor = None

    def _check_ready(self) -> None:
        if self._state != "ready":
            raise EngineNotReady(f"the llama.cpp engine is {self._state}")

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
        if self._pending >= self._max_waiting:
            raise EngineOverloaded(f"{self._pending} requests are already waiting")
        return self._stream(request)

    async def _stream(self, request: EngineRequest) -> AsyncIterator[GenerationDelta]:
        self._check_ready()
        job = _Job(request, asyncio.get_running_loop(), time.monotonic())
        self._jobs.setdefault(request.request_id, []).append(job)
        with self._counts:
            self._pending += 1
        future = job.loop.run_in_executor(self._executor, self._run_job, job)
        future.add_done_callback(lambda f: f.cancelled() and job.queue.put_nowait(EngineNotReady("engine shut down")))
        try:
            open_choices = request.options.n
            while open_choices:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                open_choices -= item.finish_reason is not None
                yield item
        finally:  # consumer gone or done: the worker stops at its next token
            job.cancelled.set()
            same = self._jobs.get(request.request_id, [])
            if job in same:
                same.remove(job)
                if not same:
                    del self._jobs[request.request_id]

    async def abort(self, request_id: str) -> None:
        for job in list(self._jobs.get(request_id, [])):
            job.cancelled.set()

    def _run_job(self, job: _Job) -> None:
        """Worker thread: every choice of one request in turn, a delta per token."""
        with self._counts:
            self._pending, self._running = self._pending - 1, self._running + 1
        try:
            opts = job.request.options
            seed = opts.seed if opts.seed is not None else self._seeds.getrandbits(63)
            queued = time.monotonic() - job.arrival
            for index in range(opts.n):
                self._run_choice(job, index, seed, queued if index == 0 else None)
        except Exception as exc:  # a failed decode must not leave the stream hanging
            logger.exception("llama.cpp generation failed")
            error = EngineError(f"generation failed: {exc!r}")
            error.__cause__ = exc
            job.put(error)
        finally:
            with self._counts:
                self._running -= 1

    def _run_choice(self, job: _Job, index: int, seed: int, queued: float | None) -> None:
        from steerserve.training.quantize.gguf import eval_prompt, last_logprobs

        prompt = list(job.request.prompt_token_ids)
        seq = Sequence(index=index, prompt_ids=prompt, options=job.request.options,
                       generator=torch.Generator().manual_seed((seed + index) % 2**63),
                       tracker=TextTracker(self._tokenizer, prompt[-_CONTEXT_IDS:], job.request.options.stop),
                       eos_ids=self._eos_ids, max_model_len=self.config.max_model_len)
        if job.cancelled.is_set():
            job.put(GenerationDelta(index, "", 0, job.abort_reason, queued_s=queued))
            return
        eval_prompt(self._llama, prompt)
        while True:
            logits = torch.from_numpy(last_logprobs(self._llama)).float()[None]
            seq.append(sample_tokens(logits, [seq])[0])
            text, count, reason = seq.take_delta()
            if job.cancelled.is_set() and reason is None:
                reason = job.abort_reason
            job.put(GenerationDelta(index, text, count, reason, queued_s=queued))
            queued = None
            self._step()
            if reason is not None:
                return
            self._llama.eval([seq.output_ids[-1]])

    def _step(self) -> None:
        if self.on_step is not None:
            try:
                self.on_step(1)
            except Exception:  # a metrics bug must not fail the requests
                logger.exception("on_step callback failed")

    async def next_token_logprobs(self, prompt_token_ids: list[int], candidates: list[int]) -> list[float]:
        self._check_ready()
        if not prompt_token_ids:
            raise InvalidRequest("the prompt has no tokens")
        if len(prompt_token_ids) > self.config.max_model_len:
            raise ContextLengthExceeded(len(prompt_token_ids), 0, self.config.max_model_len)
        loop = asyncio.get_running_loop()  # same worker thread: waits for the request in progress
        return await loop.run_in_executor(self._executor, self._logprobs, list(prompt_token_ids), list(candidates))

    def _logprobs(self, prompt_token_ids: list[int], candidates: list[int]) -> list[float]:
        from steerserve.training.quantize.gguf import eval_prompt, last_logprobs

        vocab = self._llama.n_vocab()
        if any(not 0 <= c < vocab for c in candidates):
            raise InvalidRequest(f"candidate ids must be in [0, {vocab})")
        eval_prompt(self._llama, prompt_token_ids)
        logprobs = last_logprobs(self._llama)  # float64 log-softmax over the full vocabulary
        return [float(logprobs[c]) for c in candidates]

    def weight_bytes(self) -> int:
        self._check_ready()
        return self._weight_bytes

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._pending


def gguf_tensor_bytes(path: Any) -> int:
    """Bytes of the tensor data in a GGUF file (what llama.cpp maps as weights, without metadata)."""
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(str(path)).tensors))
