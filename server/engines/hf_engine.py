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
import dataclasses
import gc
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from steerserve.nf4_correction import attach as attach_correction
from steerserve.precision import Precision, compute_dtype_here
from steerserve.server.engines.base import EngineConfig, EngineError, EngineRequest, GenerationDelta, InvalidRequest
from steerserve.server.engines.hf_scheduler import (
    DecodeBatch,
    Sequence,
    enable_padded_attention,
    model_weight_bytes,
)
from steerserve.server.engines.threaded import PendingRequest, ThreadedEngine, generation_failed

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Request(PendingRequest):
    """One request's choices; the scheduler delivers their deltas on the event loop."""

    seqs: list[Sequence] = dataclasses.field(default_factory=list)


def load_kwargs(config: EngineConfig, compute_dtype: str | None = None) -> dict[str, Any]:
    """``from_pretrained`` arguments for the configured precision (``compute_dtype`` overrides this machine's)."""
    precision = config.precision
    compute_dtype = compute_dtype or compute_dtype_here(precision)
    kwargs: dict[str, Any] = {"dtype": compute_dtype}
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
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, compute_dtype)
        )
    return kwargs | {"quantization_config": quantization, "device_map": config.extra.get("device_map", "cpu")}


def load_model(path: str, config: EngineConfig, compute_dtype: str | None = None) -> Any:
    """The model as this engine runs it, in eval mode.

    A saved nf4 checkpoint brings its own ``bnb_4bit_compute_dtype`` (the quantizing machine's), and
    transformers keeps the saved quantization config over the one passed in; the 4-bit layers are set
    to this machine's compute dtype after loading (float32 on a CPU without native bf16), and in float32
    they stay off bitsandbytes' bf16-only repacked kernel; an nf4 error correction saved beside the weights
    (``steerserve.nf4_correction``) is added to the layers' outputs. ``config.adapter``
    is injected unmerged (transformers' PEFT integration) and stays active.
    """
    from transformers import AutoModelForCausalLM

    kwargs = load_kwargs(config, compute_dtype)
    if _saved_quantization_config(path):  # pre-quantized: the saved config wins anyway; don't pass a second one
        kwargs.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    if config.precision is Precision.NF4:
        import bitsandbytes

        dtype = getattr(torch, kwargs["dtype"])
        for module in model.modules():
            if isinstance(module, bitsandbytes.nn.Linear4bit):
                module.compute_dtype = dtype
                # On an AVX-512 bf16 CPU, bitsandbytes repacks a 4-bit weight for its bf16 kernel at the first
                # inference forward, rounding each block's scale to bf16 and computing in bf16 whatever
                # compute_dtype says (and the repacking cannot be undone exactly). A float32 engine (training,
                # the twin's reference, an explicit compute dtype) keeps the stored codes and scales as they are.
                if dtype == torch.float32:
                    module.support_avx512bf16_for_cpu = False
        attach_correction(model, path)  # a low-rank correction of the rounding error stored beside, if any
    if config.adapter:
        if importlib.util.find_spec("peft") is None:  # transformers would say so with a ValueError
            raise EngineError(f"the adapter {config.adapter} needs peft: pip install -e '.[train]'")
        model.load_adapter(config.adapter)
        model.eval()
    return model


def _saved_quantization_config(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


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


class TransformersEngine(ThreadedEngine[_Request]):
    """Continuous batching over a transformers ``AutoModelForCausalLM``."""

    name = "transformers"
    thread_name = "hf-engine"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._model: Any = None
        self._batch: DecodeBatch | None = None
        self._task: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        self._waiting: collections.deque[_Request] = collections.deque()

    # ------------------------------------------------------------------ lifecycle

    def _load(self) -> None:
        from transformers import AutoTokenizer

        started = time.monotonic()
        self._tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        model = load_model(self.config.model, self.config)
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

    def _on_ready(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hf-engine-scheduler")
        self._task.add_done_callback(self._on_scheduler_exit)

    async def _stop_feeding(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _unload(self) -> None:
        self._waiting.clear()
        self._model = self._tokenizer = self._batch = None
        gc.collect()

    # ------------------------------------------------------------------ requests

    def _submit(self, request: EngineRequest) -> _Request:
        seed = self._seed(request.options)
        req = _Request(request, seqs=[self._sequence(request, i, seed) for i in range(request.options.n)])
        for seq in req.seqs:
            seq.owner = req
        self._waiting.append(req)
        self._wakeup.set()
        return req

    def _release(self, req: _Request) -> None:
        for seq in req.seqs:
            if not seq.closed:
                seq.aborted = seq.closed = True
        self._forget(req)

    def _forget(self, req: _Request) -> None:
        if req in self._waiting:
            self._waiting.remove(req)
        self._unregister(req)
        self._wakeup.set()  # the scheduler drops aborted rows at its next step

    def _cancel(self, req: _Request) -> None:
        self._finish(req, "abort")

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
            if advanced:
                self._report_step(len(advanced))

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
            self._fail(req, generation_failed(exc))
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
