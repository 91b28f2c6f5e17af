"""SteerClient (sync and async) against a real server, and the same calls through the official openai SDK."""

from __future__ import annotations

import asyncio

import openai
import pytest

from steerserve.clients.client import AsyncSteerClient, SteerAPIError, SteerClient

CHAT, RAW = "tiny:bf16", "tiny-raw:bf16"
QUESTION = {"question": "Which is a colour?", "choices": ["red", "seven", "run"]}


def test_sync_chat_stream_mcq_models_health(tiny_server) -> None:
    with SteerClient(tiny_server.url + "/v1") as client:
        assert client.health().ok and set(client.health().models) == {CHAT, RAW}
        assert {card.id for card in client.models().data} == {CHAT, RAW}
        reply = client.chat(CHAT, "Hello there", attributes={"verbosity": 1}, max_tokens=6, temperature=0)
        assert reply.attributes["verbosity"] == 1 and reply.attributes["quality"] == 4
        assert 0 < reply.usage.completion_tokens <= 6 and reply.steering == "instructions"
        chunks = list(client.chat_stream(RAW, "Hello there", attributes={"complexity": 0}, max_tokens=5, temperature=0))
        assert chunks[0].attributes["complexity"] == 0
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 5
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == client.chat(RAW, "Hello there", attributes={"complexity": 0}, max_tokens=5,
                                   temperature=0).choices[0].message.content
        single = client.mcq(CHAT, QUESTION["question"], QUESTION["choices"])
        assert single.answer in "ABC" and abs(sum(single.probabilities.values()) - 1) < 1e-3
        batch = client.mcq_batch(CHAT, [QUESTION, {**QUESTION, "context": "Colours."}], attributes={"verbosity": 0})
        assert len(batch.results) == 2 and batch.results[0].answer == single.answer


def test_errors_are_typed_with_param(tiny_server) -> None:
    with SteerClient(tiny_server.url) as client:
        with pytest.raises(SteerAPIError) as bad:
            client.chat(CHAT, "Hi", attributes={"verbosity": 9}, max_tokens=2)
        assert bad.value.status == 400 and bad.value.param == "attributes.verbosity"
        with pytest.raises(SteerAPIError) as unknown:
            list(client.chat_stream("nope:bf16", "Hi", max_tokens=2))
        assert unknown.value.status == 404 and unknown.value.code == "model_not_found"


def test_async_client_matches_sync(tiny_server) -> None:
    async def calls() -> tuple:
        async with AsyncSteerClient(tiny_server.url) as client:
            health, models = await client.health(), await client.models()
            reply = await client.chat(CHAT, "Hello there", attributes={"verbosity": 2}, max_tokens=5, temperature=0)
            chunks = [c async for c in client.chat_stream(CHAT, "Hello there", attributes={"verbosity": 2},
                                                           max_tokens=5, temperature=0)]
            single = await client.mcq(CHAT, QUESTION["question"], QUESTION["choices"])
            batch = await client.mcq_batch(CHAT, [QUESTION])
            with pytest.raises(SteerAPIError) as bad:
                await client.mcq(CHAT, "Q?", ["only one"])
            return health, models, reply, chunks, single, batch, bad.value

    health, models, reply, chunks, single, batch, error = asyncio.run(calls())
    assert health.ok and len(models.data) == 2
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content and chunks[0].attributes["verbosity"] == 2
    assert batch.results[0].index == single.index
    assert error.status == 400 and error.param and "choices" in error.param


def test_same_calls_through_openai_sdk(tiny_server) -> None:
    sdk = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in sdk.models.list().data} == {CHAT, RAW}
    reply = sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hello there"}],
                                        max_tokens=5, temperature=0, extra_body={"attributes": {"verbosity": 1}})
    assert reply.model_extra["attributes"]["verbosity"] == 1
    stream = sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hello there"}],
                                         max_tokens=5, temperature=0, stream=True,
                                         extra_body={"attributes": {"verbosity": 1}})
    chunks = list(stream)
    assert chunks[0].model_extra["attributes"]["verbosity"] == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    mcq = sdk.post("/mcq", cast_to=object, body={"model": CHAT, **QUESTION})
    batch = sdk.post("/mcq", cast_to=object, body={"model": CHAT, "items": [QUESTION, QUESTION]})
    assert mcq["answer"] in "ABC" and [r["answer"] for r in batch["results"]] == [mcq["answer"]] * 2
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}],
                                    extra_body={"attributes": {"humor": 7}})
    assert bad.value.body["param"] == "attributes.humor"
