"""Multiple choice by next-token probabilities, not by parsing generated text.

The prompt is the shared MCQ renderer's question turn followed by the assistant
prefix ``Answer:``; each choice is the probability of its letter token (``" A"``)
as the next token, renormalised over the choices. With ``explain`` the model
then writes its explanation after the chosen letter.
"""

from __future__ import annotations

import asyncio
import math

from steerserve.attributes import resolve_attributes
from steerserve.prompts import (
    MCQ_ANSWER_PREFIX,
    MCQ_EXPLANATION_PREFIX,
    MCQ_LETTERS,
    mcq_answer_token_text,
    render_mcq_question,
)
from steerserve.server.errors import APIError
from steerserve.server.generation import Generator
from steerserve.server.protocol import MCQItem, MCQRequest, MCQResponse, MCQResult, UsageInfo
from steerserve.server.variants import Variant, VariantRegistry


def letter_token_ids(variant: Variant, count: int) -> list[int]:
    """Token id of " A", " B", ... for this tokenizer; 422 if a letter is not a single token."""
    ids = []
    for index in range(count):
        encoded = variant.tokenizer.encode(mcq_answer_token_text(index), add_special_tokens=False)
        if len(encoded) != 1:
            raise APIError(
                422,
                f"model {variant.id!r} has no single token for {mcq_answer_token_text(index)!r}; it cannot score choices",
                param="choices",
                code="unsupported_model",
            )
        ids.extend(encoded)
    return ids


def normalise(logprobs: list[float]) -> list[float]:
    """Softmax over the choices' log-probabilities (stable: subtract the max)."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


class MCQService:
    """Serves /v1/mcq, single items and batches."""

    def __init__(self, registry: VariantRegistry, generator: Generator) -> None:
        self.registry = registry
        self.generator = generator

    async def answer(self, request: MCQRequest) -> MCQResponse:
        variant = self.registry.get(request.model)
        items = request.items or []
        scored = await asyncio.gather(*(self._score(variant, item, request) for item in items))
        results = [result for result, _, _ in scored]
        common = {
            "model": variant.id,
            "attributes": resolve_attributes(request.attributes),
            "steering": variant.steering.value if variant.steering else None,
            "usage": UsageInfo.of(sum(s[1] for s in scored), sum(s[2] for s in scored)),
        }
        if request.question is not None:
            return MCQResponse(**common, **results[0].model_dump())
        return MCQResponse(**common, object="mcq.batch", results=results)

    async def _score(self, variant: Variant, item: MCQItem, request: MCQRequest) -> tuple[MCQResult, int, int]:
        """The item's result, its prompt tokens and the explanation's generated tokens."""
        user_turn = render_mcq_question(item.question, item.choices, item.context)
        prompt = variant.render([{"role": "user", "content": user_turn}], request.attributes, MCQ_ANSWER_PREFIX)
        ids = variant.tokenize(prompt)
        self.generator.max_tokens(variant, len(ids), 1, "question")
        candidates = letter_token_ids(variant, len(item.choices))
        probabilities = normalise(await variant.engine.next_token_logprobs(ids, candidates))
        index = max(range(len(probabilities)), key=probabilities.__getitem__)
        result = MCQResult(
            answer=MCQ_LETTERS[index],
            index=index,
            probabilities={MCQ_LETTERS[i]: p for i, p in enumerate(probabilities)},
        )
        generated = 0
        if request.explain:
            result.explanation, generated = await self._explain(variant, prompt, index, request.explain_max_tokens)
        return result, len(ids), generated

    async def _explain(self, variant: Variant, prompt: str, index: int, max_tokens: int) -> tuple[str, int]:
        """Greedy continuation after the chosen letter and ``Explanation:``, as MCQ SFT trains it."""
        text = prompt + mcq_answer_token_text(index) + MCQ_EXPLANATION_PREFIX
        ids = variant.tokenize(text)
        budget = min(max_tokens, variant.max_model_len - len(ids))
        if budget < 1:
            return "", 0
        prepared = self.generator.prepare(variant, text, requested_max_tokens=budget, field="question", temperature=0.0)
        texts, _, tokens = await self.generator.collect(prepared)
        return texts[0].strip(), tokens
