"""The shared path from a prepared prompt to engine deltas, with limits and metrics.

Chat, completions and MCQ explanations all go through :meth:`Generator.stream`,
so every request is length-checked the same way and timed into the same
Prometheus series.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from steerserve.server.engines.base import (GREEDY_BELOW, EndPush, EngineRequest, GenerationDelta, LogitBias,
                                            SamplingOptions)
from steerserve.server.errors import APIError
from steerserve.server.metrics import ServerMetrics
from steerserve.server.protocol import random_id
from steerserve.server.settings import ServerSettings
from steerserve.server.variants import Variant


@dataclass
class Prepared:
    """A request reduced to what the engine needs."""

    variant: Variant
    prompt: str
    prompt_token_ids: list[int]
    options: SamplingOptions
    request_id: str


class Generator:
    """Turns prepared prompts into engine streams, enforcing limits and recording metrics."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.in_flight: dict[str, int] = {}
        """Generations per variant between their first and last delta (for backpressure)."""

    def admit(self, variant: Variant) -> None:
        """429 before any work when the variant's batch and queue are full: memory stays bounded."""
        capacity = self.settings.max_num_seqs + self.settings.max_queue
        if self.in_flight.get(variant.id, 0) >= capacity:
            error = APIError(
                429,
                f"model {variant.id!r} has {capacity} requests in flight (batch + queue); retry shortly",
                code="queue_full",
            )
            error.headers["Retry-After"] = "1"
            raise error

    def max_tokens(self, variant: Variant, prompt_tokens: int, requested: int | None, field: str) -> int:
        """Validate the prompt length and resolve ``max_tokens`` against the context window."""
        limit = variant.max_model_len
        if prompt_tokens >= limit:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens; the prompt has {prompt_tokens}",
                param=field,
                code="context_length_exceeded",
            )
        if requested is None:
            return min(self.settings.default_max_tokens, limit - prompt_tokens)
        if requested > self.settings.max_tokens_limit:
            raise APIError(400, f"max_tokens may be at most {self.settings.max_tokens_limit}", param="max_tokens")
        if prompt_tokens + requested > limit:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens; the prompt has {prompt_tokens} "
                f"and max_tokens asks for {requested} more",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def prepare(
        self,
        variant: Variant,
        prompt: str,
        *,
        requested_max_tokens: int | None,
        field: str,
        temperature: float = 1.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        min_tokens: int = 0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: LogitBias | None = None,
        guidance: LogitBias | None = None,
        end_push: EndPush | None = None,
        loop_guard: int | None = None,
    ) -> Prepared:
        self.admit(variant)
        ids = variant.tokenize(prompt)
        max_tokens = self.max_tokens(variant, len(ids), requested_max_tokens, field)
        if min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({min_tokens}) is more than the {max_tokens} tokens this request may "
                                "generate", param="min_tokens")
        options = SamplingOptions(
            max_tokens=max_tokens,
            # Below 1e-5 sampling is greedy (as in vLLM): dividing logits by a denormal overflows.
            temperature=temperature if temperature >= GREEDY_BELOW else 0.0,
            top_p=top_p,
            seed=seed,
            stop=tuple(dict.fromkeys([*variant.stops(), *stop])),
            n=n,
            ignore_eos=ignore_eos,
            min_tokens=min_tokens,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logit_bias=logit_bias,
            guidance=guidance,
            end_push=end_push,
            loop_repeats=variant.loop_guard if loop_guard is None else loop_guard,
        )
        return Prepared(variant, prompt, ids, options, random_id("req"))

    async def stream(self, prepared: Prepared) -> AsyncIterator[GenerationDelta]:
        """Engine deltas for one prompt, counted in flight (backpressure) and timed (metrics)."""
        model = prepared.variant.id
        request = EngineRequest(prepared.request_id, prepared.prompt_token_ids, prepared.options)
        self.metrics.prompt_tokens.labels(model_name=model).inc(len(prepared.prompt_token_ids))
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
        try:
            # aclosing: a client that goes away closes this stream, and with it the engine's at once
            # (the engine's finally aborts the request and frees its batch slot).
            async with aclosing(self._timed(model, prepared.variant.engine.generate(request))) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            self.in_flight[model] -= 1

    async def _timed(self, model: str, deltas: AsyncIterator[GenerationDelta]) -> AsyncIterator[GenerationDelta]:
        """Pass deltas through, recording TTFT, inter-token, queue and e2e latency and token counts."""
        start = last = time.perf_counter()
        first, generated = True, 0
        try:
            async with aclosing(deltas):
                async for delta in deltas:
                    now = time.perf_counter()
                    if first:
                        self.metrics.ttft.labels(model_name=model).observe(now - start)
                        first = False
                    elif delta.token_count:
                        self.metrics.itl.labels(model_name=model).observe((now - last) / delta.token_count)
                    if delta.queued_s is not None:
                        self.metrics.queue_time.labels(model_name=model).observe(delta.queued_s)
                    last = now
                    generated += delta.token_count
                    if delta.finish_reason:
                        self.metrics.finished.labels(model_name=model, finished_reason=delta.finish_reason).inc()
                    yield delta
            self.metrics.e2e.labels(model_name=model).observe(time.perf_counter() - start)
        finally:  # tokens of abandoned requests were generated too
            self.metrics.generation_tokens.labels(model_name=model).inc(generated)

    async def collect(self, prepared: Prepared) -> tuple[list[str], list[str | None], int]:
        """Run to completion: texts and finish reasons per choice, and the generated token count."""
        n = prepared.options.n
        texts, reasons, tokens = [""] * n, [None] * n, 0
        async for delta in self.stream(prepared):
            texts[delta.index] += delta.text
            tokens += delta.token_count
            reasons[delta.index] = delta.finish_reason or reasons[delta.index]
        return texts, reasons, tokens


async def merge_streams(
    streams: Sequence[AsyncIterator[GenerationDelta]],
) -> AsyncIterator[tuple[int, GenerationDelta]]:
    """Interleave several streams as their deltas arrive, tagging each with its stream's position."""
    queue: asyncio.Queue[tuple[int, GenerationDelta | None | BaseException]] = asyncio.Queue()

    async def pump(position: int, stream: AsyncIterator[GenerationDelta]) -> None:
        try:
            async for delta in stream:
                await queue.put((position, delta))
            await queue.put((position, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((position, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        pending = len(tasks)
        while pending:
            position, item = await queue.get()
            if item is None:
                pending -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
