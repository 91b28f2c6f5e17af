"""Chat and text completions: request -> steered prompt -> engine -> OpenAI response or SSE.

    service = CompletionService(registry, generator)
    response = await service.chat(ChatCompletionRequest(model="tiny:bf16", messages=[...]))
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from steerserve.attributes import resolve_attributes
from steerserve.server.engines.base import LogitBias
from steerserve.server.errors import APIError, sse_error_frame
from steerserve.server.generation import Generator, Prepared, merge_streams
from steerserve.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    RenderRequest,
    RenderResponse,
    UsageInfo,
    random_id,
)
from steerserve.server.variants import Variant, VariantRegistry

DONE = "data: [DONE]\n\n"


def sse(payload: ChatCompletionChunk | CompletionResponse) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


def chat_messages(request: ChatCompletionRequest | RenderRequest) -> list[dict[str, str]]:
    """Messages as plain role/content dicts; ``developer`` is OpenAI's newer name for ``system``."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages or []
    ]


class CompletionService:
    """Serves /v1/chat/completions, /v1/completions and /v1/render."""

    def __init__(self, registry: VariantRegistry, generator: Generator) -> None:
        self.registry = registry
        self.generator = generator

    # ---- prompts ---------------------------------------------------------------

    def chat_prompt(self, variant: Variant, request: ChatCompletionRequest | RenderRequest) -> str:
        return variant.render(chat_messages(request), request.attributes)

    def completion_prompt(self, variant: Variant, prompt: str, attributes: dict[str, int] | None) -> str:
        """Raw text, unless sliders were sent: then the prompt is a user turn in the model's steering format."""
        if attributes is None:
            return prompt
        return variant.render([{"role": "user", "content": prompt}], attributes)

    def _logit_bias(self, variant: Variant, request) -> LogitBias | None:  # noqa: ANN001
        """The caller's ``logit_bias``, its ids checked against the vocabulary."""
        if not request.logit_bias:
            return None
        vocab = len(variant.tokenizer)
        for token in request.logit_bias:
            if int(token) >= vocab:
                raise APIError(400, f"logit_bias: token id {token} is outside the vocabulary of {variant.id} "
                                    f"(0-{vocab - 1})", param="logit_bias")
        return LogitBias.of({int(token): bias for token, bias in request.logit_bias.items()})

    def _prepare(self, variant: Variant, prompt: str, request, field: str) -> Prepared:  # noqa: ANN001
        requested = getattr(request, "max_completion_tokens", None) or request.max_tokens
        return self.generator.prepare(
            variant,
            prompt,
            requested_max_tokens=requested,
            field=field,
            temperature=request.temperature,
            top_p=request.top_p,
            n=request.n,
            seed=request.seed,
            stop=request.stop or [],
            ignore_eos=request.ignore_eos,
            loop_guard=request.loop_guard,
            min_tokens=request.min_tokens,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            logit_bias=self._logit_bias(variant, request),
            guidance=variant.complexity_bias(request.attributes),
            end_push=variant.end_push(request.attributes),
        )

    def render(self, request: RenderRequest) -> RenderResponse:
        variant = self.registry.get(request.model)
        if request.messages is not None:
            prompt = self.chat_prompt(variant, request)
        else:
            prompt = self.completion_prompt(variant, request.prompt or "", request.attributes)
        ids = variant.tokenize(prompt)
        steered = request.messages is not None or request.attributes is not None
        return RenderResponse(
            model=variant.id,
            prompt=prompt,
            prompt_token_ids=ids,
            num_tokens=len(ids),
            steering=variant.steering.value if variant.steering else "",
            attributes=resolve_attributes(request.attributes) if steered else None,
            stop=variant.stops() if steered else [],
        )

    # ---- chat ------------------------------------------------------------------

    def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        variant = self.registry.get(request.model)
        return self._prepare(variant, self.chat_prompt(variant, request), request, "messages")

    async def chat(self, request: ChatCompletionRequest, prepared: Prepared) -> ChatCompletionResponse:
        texts, reasons, tokens = await self.generator.collect(prepared)
        return ChatCompletionResponse(
            model=prepared.variant.id,
            choices=[
                ChatCompletionChoice(index=i, message=ChatResponseMessage(content=t), finish_reason=r)
                for i, (t, r) in enumerate(zip(texts, reasons))
            ],
            usage=UsageInfo.of(len(prepared.prompt_token_ids), tokens),
            attributes=resolve_attributes(request.attributes),
            steering=prepared.variant.steering.value if prepared.variant.steering else None,
        )

    async def chat_stream(self, request: ChatCompletionRequest, prepared: Prepared) -> AsyncIterator[str]:
        """SSE frames: a role frame per choice, content deltas, finish frames, optional usage, [DONE]."""
        variant = prepared.variant
        base = {"id": random_id("chatcmpl"), "model": variant.id}
        steered = {
            "attributes": resolve_attributes(request.attributes),
            "steering": variant.steering.value if variant.steering else None,
        }
        tokens = 0
        try:
            roles = [
                ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                for index in range(prepared.options.n)
            ]
            yield sse(ChatCompletionChunk(**base, **steered, choices=roles))
            async with aclosing(self.generator.stream(prepared)) as deltas:  # closed at once on disconnect
                async for delta in deltas:
                    tokens += delta.token_count
                    if not delta.text and not delta.finish_reason:
                        continue
                    choice = ChatCompletionStreamChoice(
                        index=delta.index,
                        delta=DeltaMessage(content=delta.text) if delta.text else DeltaMessage(),
                        finish_reason=delta.finish_reason,
                    )
                    yield sse(ChatCompletionChunk(**base, choices=[choice]))
            if request.stream_options and request.stream_options.include_usage:
                final = UsageInfo.of(len(prepared.prompt_token_ids), tokens)
                yield sse(ChatCompletionChunk(**base, choices=[], usage=final))
        except Exception as exc:  # the status line is gone: report in-band, then end cleanly
            yield sse_error_frame(exc)
        yield DONE

    # ---- text completions --------------------------------------------------------

    def prepare_completions(self, request: CompletionRequest) -> list[Prepared]:
        variant = self.registry.get(request.model)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        return [
            self._prepare(variant, self.completion_prompt(variant, p, request.attributes), request, "prompt")
            for p in prompts
        ]

    def _completion_base(self, request: CompletionRequest, variant: Variant) -> dict:
        steered = request.attributes is not None
        return {
            "model": variant.id,
            "attributes": resolve_attributes(request.attributes) if steered else None,
            "steering": variant.steering.value if steered and variant.steering else None,
        }

    async def completions(self, request: CompletionRequest, batch: list[Prepared]) -> CompletionResponse:
        n = request.n
        choices: list[CompletionChoice] = []
        prompt_tokens = completion_tokens = 0
        results = await asyncio.gather(*(self.generator.collect(p) for p in batch))  # batched by the engine
        for position, (prepared, (texts, reasons, tokens)) in enumerate(zip(batch, results)):
            prompt_tokens += len(prepared.prompt_token_ids)
            completion_tokens += tokens
            echo = prepared.prompt if request.echo else ""
            choices.extend(
                CompletionChoice(index=position * n + i, text=echo + t, finish_reason=r)
                for i, (t, r) in enumerate(zip(texts, reasons))
            )
        base = self._completion_base(request, batch[0].variant)
        return CompletionResponse(**base, choices=choices, usage=UsageInfo.of(prompt_tokens, completion_tokens))

    async def completions_stream(self, request: CompletionRequest, batch: list[Prepared]) -> AsyncIterator[str]:
        first = {"id": random_id("cmpl"), **self._completion_base(request, batch[0].variant)}
        base = {"id": first["id"], "model": first["model"]}
        n, tokens = request.n, 0
        try:
            yield sse(CompletionResponse(**first, choices=[]))  # carries the applied attributes once
            if request.echo:
                for position, prepared in enumerate(batch):
                    for i in range(n):
                        choice = CompletionChoice(index=position * n + i, text=prepared.prompt)
                        yield sse(CompletionResponse(**base, choices=[choice]))
            streams = [self.generator.stream(p) for p in batch]
            async for position, delta in merge_streams(streams):
                tokens += delta.token_count
                if delta.text or delta.finish_reason:
                    choice = CompletionChoice(
                        index=position * n + delta.index, text=delta.text, finish_reason=delta.finish_reason
                    )
                    yield sse(CompletionResponse(**base, choices=[choice]))
            if request.stream_options and request.stream_options.include_usage:
                prompt_tokens = sum(len(p.prompt_token_ids) for p in batch)
                yield sse(CompletionResponse(**base, choices=[], usage=UsageInfo.of(prompt_tokens, tokens)))
        except Exception as exc:
            yield sse_error_frame(exc)
        yield DONE


def check_stream_options(request: ChatCompletionRequest | CompletionRequest) -> None:
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
