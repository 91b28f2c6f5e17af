"""GGUF variants (gguf-q8_0, gguf-q4_k_m) through llama-cpp-python, one sequence at a time.

    engine = LlamaCppEngine(EngineConfig(model="/variants/gguf-q4_k_m", precision=Precision.GGUF_Q4_K_M))

llama-cpp-python's ``Llama`` is not thread-safe and holds one sequence's KV cache, so
this engine does NOT batch: every call into llama.cpp runs in one worker thread, and
requests (and the ``n`` choices of one request) are served one after another in
arrival order; the rest wait (``waiting``). Sampling and stop strings reuse the
transformers engine's ``Sequence`` / ``TextTracker`` and the shared ``sample_tokens`` on logits read
from llama.cpp, so seeds, temperature, top_p and penalties mean the same on both engines.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import torch

from steerserve.server.engines.base import (
    EngineConfig, EngineError, EngineNotReady, EngineRequest, GenerationDelta, InvalidRequest,
)
from steerserve.server.engines.hf_scheduler import Sequence
from steerserve.server.engines.sampling import sample_tokens
from steerserve.server.engines.threaded import PendingRequest, ThreadedEngine, generation_failed

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Job(PendingRequest):
    """One request: the worker thread runs it and checks ``cancelled`` at every token."""

    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


class LlamaCppEngine(ThreadedEngine[_Job]):
    """One GGUF model in llama.cpp; requests run strictly one after another."""

    name = "llama.cpp"
    thread_name = "llamacpp-engine"
    # A queued job would start only to abort at once; its stream ends in EngineNotReady instead.
    cancel_queued_on_shutdown = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._llama: Any = None
        self._weight_bytes = 0
        self._pending = 0  # submitted, not yet started (gauge)
        self._running = 0
        self._counts = threading.Lock()  # the gauges change on both threads

    # ------------------------------------------------------------------ lifecycle

    def _load(self) -> None:
        from transformers import AutoTokenizer

        from steerserve.training.quantize.gguf import find_gguf, load_llama

        started = time.monotonic()
        path = find_gguf(self.config.model)
        self._tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        # engine_args of the variant reach llama.cpp, less the queue bound the shared base reads.
        arguments = {k: v for k, v in self.config.extra.items() if k != "max_waiting"}
        try:
            self._llama = load_llama(path.parent, n_ctx=self.config.max_model_len, seed=self.config.seed,
                                     **arguments)
        except ValueError as exc:
            raise EngineError(f"engine_args of {self.config.model}: {exc}") from exc
        if self._llama.n_vocab() < len(self._tokenizer):
            raise EngineError(f"{path} has {self._llama.n_vocab()} tokens but the tokenizer {len(self._tokenizer)}")
        eos = {self._tokenizer.eos_token_id, self._llama.token_eos()}
        self._eos_ids = frozenset(i for i in eos if i is not None and i >= 0)
        self._weight_bytes = gguf_tensor_bytes(path)
        logger.info("loaded %s (%s) in llama.cpp in %.1f s", path, self.config.precision.value,
                    time.monotonic() - started)

    def _unload(self) -> None:
        if self._llama is not None:
            self._llama.close()
        self._llama = self._tokenizer = None

    def _not_ready_message(self) -> str:  # this engine's wording from before the shared base
        return f"the llama.cpp engine is {self._state}"

    # ------------------------------------------------------------------ requests

    def _submit(self, request: EngineRequest) -> _Job:
        job = _Job(request)
        with self._counts:
            self._pending += 1
        future = job.loop.run_in_executor(self._executor, self._run_job, job)
        future.add_done_callback(lambda f: f.cancelled() and job.queue.put_nowait(EngineNotReady("engine shut down")))
        return job

    def _release(self, job: _Job) -> None:
        job.cancelled.set()  # the worker stops at its next token
        self._unregister(job)

    def _cancel(self, job: _Job) -> None:
        job.cancelled.set()

    def _run_job(self, job: _Job) -> None:
        """Worker thread: every choice of one request in turn, a delta per token."""
        with self._counts:
            self._pending, self._running = self._pending - 1, self._running + 1
        try:
            seed = self._seed(job.request.options)
            queued = time.monotonic() - job.arrival
            for index in range(job.request.options.n):
                self._run_choice(job, self._sequence(job.request, index, seed), queued if index == 0 else None)
        except Exception as exc:  # a failed decode must not leave the stream hanging
            logger.exception("llama.cpp generation failed")
            job.put_threadsafe(generation_failed(exc))
        finally:
            with self._counts:
                self._running -= 1

    def _run_choice(self, job: _Job, seq: Sequence, queued: float | None) -> None:
        from steerserve.training.quantize.gguf import eval_prompt, last_logits

        if job.cancelled.is_set():
            job.put_threadsafe(GenerationDelta(seq.index, "", 0, "abort", queued_s=queued))
            return
        eval_prompt(self._llama, seq.prompt_ids)
        greedy, adjusted = seq.options.greedy, seq.options.adjusts_logits
        while True:
            # Raw float32 logits: softmax(logits / T) is the distribution the log-probs gave, and greedy
            # needs only the argmax, so nothing is normalised per token (a full-vocabulary float64
            # log-softmax per token cost more than the sampling itself; benchmarks/NOTES.md).
            logits = last_logits(self._llama)
            if greedy and not adjusted:
                seq.append(int(logits.argmax()))
            else:
                seq.append(sample_tokens(torch.from_numpy(logits.copy())[None], [seq])[0])
            text, count, reason = seq.take_delta()
            if job.cancelled.is_set() and reason is None:
                reason = "abort"
            job.put_threadsafe(GenerationDelta(seq.index, text, count, reason, queued_s=queued))
            queued = None
            self._report_step(1)
            if reason is not None:
                return
            self._llama.eval([seq.output_ids[-1]])

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
