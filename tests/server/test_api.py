"""The HTTP API end to end, on a real uvicorn server, for every engine.

Two variants per server: ``tiny:bf16`` (own chat template -> instructions
steering) and ``tiny-raw:bf16`` (no template -> SteerLM format). The official
``openai`` SDK and raw httpx are the clients.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from live_server import serve_models

from steerserve.attributes import format_attributes
from steerserve.prompts import LEVEL_INSTRUCTIONS

CHAT, RAW = "tiny:bf16", "tiny-raw:bf16"
HELLO = [{"role": "user", "content": "Hello world! How are you today?"}]


@pytest.fixture(
    scope="module",
    params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)],
)
def server(request: pytest.FixtureRequest, tiny_model_dir: Path, tiny_raw_model_dir: Path) -> Iterator:
    with serve_models({"tiny": tiny_model_dir, "tiny-raw": tiny_raw_model_dir}, request.param) as live:
        live.engine = request.param
        yield live


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path: str, body: object) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


# ---- happy paths -------------------------------------------------------------


def test_models_lists_variants_with_engine_precision_and_steering(server, client) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {CHAT, RAW}
    chat = cards[CHAT].model_dump()
    assert chat["engine"] == server.engine and chat["precision"] == "bf16" and chat["ready"] is True
    assert chat["steering"] == "instructions" and cards[RAW].model_dump()["steering"] == "steerlm"
    assert chat["weight_bytes"] > 100_000
    retrieved = client.models.retrieve(RAW).model_dump()
    assert retrieved == cards[RAW].model_dump() | {"created": retrieved["created"]}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope:bf16")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_chat_non_streaming_echoes_applied_attributes(client) -> None:
    response = client.chat.completions.create(
        model=CHAT, messages=HELLO, max_tokens=8, temperature=0, extra_body={"attributes": {"verbosity": 1}}
    )
    extra = response.model_extra or {}
    assert extra["attributes"]["verbosity"] == 1 and extra["attributes"]["quality"] == 4
    assert extra["steering"] == "instructions"
    assert response.choices[0].finish_reason in ("length", "stop")
    assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_streaming_equals_non_streaming_and_reports_usage(client) -> None:
    args = dict(model=RAW, messages=HELLO, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_raw_sse_ends_with_done(server) -> None:
    body = {"model": CHAT, "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in response.iter_lines() if line]
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[0][6:])["object"] == "chat.completion.chunk"


@pytest.mark.parametrize(("model", "marker"), [(CHAT, LEVEL_INSTRUCTIONS["verbosity"][1]), (RAW, "verbosity:1")])
def test_render_shows_the_sliders_in_the_prompt_the_engine_gets(server, client, model: str, marker: str) -> None:
    rendered = post(server, "/v1/render", {"model": model, "messages": HELLO, "attributes": {"verbosity": 1}}).json()
    assert marker in rendered["prompt"]
    assert rendered["num_tokens"] == len(rendered["prompt_token_ids"])
    response = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=2, extra_body={"attributes": {"verbosity": 1}}
    )
    assert response.usage.prompt_tokens == rendered["num_tokens"]
    other = post(server, "/v1/render", {"model": model, "messages": HELLO, "attributes": {"verbosity": 3}}).json()
    assert other["prompt"] != rendered["prompt"]


def test_steerlm_variant_uses_the_nemo_format_and_stop(server) -> None:
    rendered = post(server, "/v1/render", {"model": RAW, "messages": HELLO}).json()
    assert rendered["prompt"].startswith("<extra_id_0>System\n")
    assert rendered["prompt"].endswith(f"<extra_id_2>{format_attributes(None)}\n")
    assert rendered["stop"] == ["<extra_id_1>"]


def test_completions_raw_n_echo_and_stream(client) -> None:
    response = client.completions.create(model=CHAT, prompt="The quick brown", max_tokens=5, n=2, echo=True, seed=3)
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.text.startswith("The quick brown") for c in response.choices)
    assert (response.model_extra or {}).get("attributes") is None  # raw text: nothing steered
    streamed = client.completions.create(model=CHAT, prompt=["a", "b"], max_tokens=3, stream=True, temperature=0)
    indexes = {c.choices[0].index for c in streamed if c.choices}
    assert indexes == {0, 1}


def test_seed_makes_sampling_reproducible(client) -> None:
    args = dict(model=CHAT, messages=HELLO, max_tokens=10, temperature=1.0, seed=1234, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**args).choices[0].message.content
    assert client.chat.completions.create(**args).choices[0].message.content == first


def test_penalties_from_the_openai_sdk_change_greedy_output(client) -> None:
    """frequency_penalty / presence_penalty are SDK arguments, repetition_penalty rides in extra_body."""
    args = dict(model=CHAT, prompt="Hello", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**args).choices[0].text
    assert client.completions.create(**args, frequency_penalty=0.0, presence_penalty=0.0).choices[0].text == plain
    penalised = client.completions.create(**args, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    repeated = client.completions.create(model=CHAT, prompt="Hello", max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True, "repetition_penalty": 3.0}).choices[0].text
    assert plain not in (penalised, repeated)


def test_logit_bias_from_the_openai_sdk_forces_and_bans_tokens(client, tiny_model_dir: Path) -> None:
    """OpenAI's logit_bias: +100 makes greedy decoding repeat a token, -100 bans the token it picked."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = dict(model=CHAT, prompt="Hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    forced = tokenizer.convert_tokens_to_ids("a")
    assert client.completions.create(**args, logit_bias={str(forced): 100}).choices[0].text == "a" * 6
    plain = client.completions.create(**args).choices[0].text
    first = tokenizer(plain, add_special_tokens=False).input_ids[0]
    banned = client.completions.create(**args, logit_bias={str(first): -100}).choices[0].text
    assert first not in tokenizer(banned, add_special_tokens=False).input_ids


@contextmanager
def plain_and_guided(tiny_model_dir: Path, setting: str, strength: float) -> Iterator[openai.OpenAI]:
    """A transformers server with the tiny model twice: ``plain`` with ``setting``=0 and ``guided`` at the
    server's strength, set by the setting's flag; the model cards must say so."""
    from live_server import LiveServer

    from steerserve.cli import serve_settings
    from steerserve.server.app import create_app

    settings = serve_settings(["--engine", "transformers", "--max-model-len", "512",
                               f"--{setting.replace('_', '-')}", str(strength),
                               "--model", f"{tiny_model_dir},name=plain,{setting}=0",
                               "--model", f"{tiny_model_dir},name=guided"])
    with LiveServer(create_app(settings)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        cards = {card.id: card.model_dump()[setting] for card in client.models.list().data}
        assert cards == {"plain:bf16": 0.0, "guided:bf16": strength}
        yield client


def test_complexity_slider_pushes_decoding_toward_plain_text(client, tiny_model_dir: Path) -> None:
    """Below complexity 4 the reading-level bias favours sentence ends and penalises long words; at 4 (the
    default) the answer is the model's own."""
    from transformers import AutoTokenizer

    from steerserve.reading_level import ReadingLevelGuide

    assert client.models.retrieve(CHAT).model_dump()["reading_level_guidance"] == 2.0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    guide = ReadingLevelGuide.from_tokenizer(tokenizer)
    scores, ends = dict(guide.scores), set(guide.sentence_ends)

    def answer(attributes: dict[str, int] | None) -> tuple[str, float, int]:
        text = client.chat.completions.create(
            model=CHAT, messages=HELLO, max_tokens=24, temperature=0,
            extra_body={"ignore_eos": True, "attributes": attributes}).choices[0].message.content
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return text, sum(scores.get(i, 0.0) for i in ids), sum(i in ends for i in ids)

    default, level4, plain = answer(None), answer({"complexity": 4}), answer({"complexity": 0})
    assert default == level4 != plain
    assert plain[1] <= level4[1] and plain[2] > level4[2]


def test_guidance_strength_from_the_cli_and_per_variant(tiny_model_dir: Path) -> None:
    """--reading-level-guidance sets the server's strength; a variant's reading_level_guidance=0 turns it off
    for that variant alone, whose complexity-0 answer is then the prompt's doing only."""
    with plain_and_guided(tiny_model_dir, "reading_level_guidance", 3.0) as client:
        def answer(model: str, complexity: int) -> str:
            return client.chat.completions.create(
                model=model, messages=HELLO, max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True, "attributes": {"complexity": complexity}}).choices[0].message.content

        plain_prompt_only = answer("plain:bf16", 0)
        assert answer("guided:bf16", 0) != plain_prompt_only
        assert answer("guided:bf16", 4) == answer("plain:bf16", 4)


def test_min_tokens_holds_back_the_end_token(client, tiny_model_dir: Path) -> None:
    """vLLM's min_tokens on every engine: the end-of-sequence token cannot come before that many tokens, even
    forced by a logit bias; more than max_tokens is a 400 naming the field."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    args = dict(model=CHAT, messages=HELLO, max_tokens=8, temperature=0, logit_bias={str(eos): 100})
    at_once = client.chat.completions.create(**args)
    assert at_once.usage.completion_tokens == 1 and at_once.choices[0].finish_reason == "stop"
    held = client.chat.completions.create(**args, extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**args, extra_body={"min_tokens": 9})
    assert err.value.body["param"] == "min_tokens"


def test_verbosity_guidance_pushes_the_end_token_at_sentence_ends(tiny_model_dir: Path) -> None:
    """Below verbosity 4 the slider raises the end-of-turn token by strength * (4 - level) / 4 logits right after
    a finished sentence: with "." forced by 100 logits and the end token held 5 below it, a push of more than 5
    ends the answer after its first full stop, while with less, or none, the stops run on to max_tokens. At 4 (the default) the
    answer is the model's own. --verbosity-guidance sets the server's strength, a variant's
    verbosity_guidance=0 turns it off for that variant alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    stop, eos = tokenizer.convert_tokens_to_ids("."), tokenizer.eos_token_id
    with plain_and_guided(tiny_model_dir, "verbosity_guidance", 10.0) as client:
        def answer(model: str, verbosity: int, **extra) -> tuple[str, int, str]:
            reply = client.chat.completions.create(
                model=model, messages=HELLO, max_tokens=16, temperature=0,
                extra_body={"attributes": {"verbosity": verbosity}, **extra})
            return reply.choices[0].message.content, reply.usage.completion_tokens, reply.choices[0].finish_reason

        stops = {"logit_bias": {str(stop): 100, str(eos): 95}}
        assert answer("guided:bf16", 0, **stops) == (".", 2, "stop")
        assert answer("guided:bf16", 1, **stops) == (".", 2, "stop")  # 7.5 logits
        assert answer("guided:bf16", 3, **stops) == ("." * 16, 16, "length")  # 2.5: less than the 5 held back
        assert answer("plain:bf16", 0, **stops) == ("." * 16, 16, "length")
        assert answer("guided:bf16", 4, **stops) == ("." * 16, 16, "length")
        assert answer("guided:bf16", 4) == answer("plain:bf16", 4)


def test_loop_guard_ends_an_answer_at_its_loop(tiny_model_dir: Path) -> None:
    """With "." forced by 100 logits the answer is a one-token loop: the guard ends it at the 32nd "." (the
    shortest run it counts), for any number of copies the server asks; a variant's loop_guard=0, or a request's
    ignore_eos or loop_guard=0, lets it run on to max_tokens; a request's loop_guard=3 guards an unguarded variant,
    and one copy is no loop: a 400 naming the field."""
    from transformers import AutoTokenizer

    stop = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids(".")
    with plain_and_guided(tiny_model_dir, "loop_guard", 3) as client:
        def answer(model: str, **extra) -> tuple[str, int, str]:
            reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=48, temperature=0,
                                                   logit_bias={str(stop): 100}, extra_body=extra)
            return reply.choices[0].message.content, reply.usage.completion_tokens, reply.choices[0].finish_reason

        assert answer("guided:bf16") == ("." * 32, 33, "stop")
        assert answer("plain:bf16") == answer("guided:bf16", ignore_eos=True) == ("." * 48, 48, "length")
        assert answer("guided:bf16", loop_guard=0) == ("." * 48, 48, "length")
        assert answer("plain:bf16", loop_guard=3) == ("." * 32, 33, "stop")
        with pytest.raises(openai.BadRequestError) as err:
            answer("guided:bf16", loop_guard=1)
        assert err.value.body["param"] == "loop_guard"


def test_stop_string_cuts_the_output(client) -> None:
    args = dict(model=CHAT, prompt="Hello", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**args).choices[0].text
    if len(full) < 4:
        pytest.skip(f"greedy output too short to cut: {full!r}")
    stop = full[2:4]
    cut = client.completions.create(**args, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_mcq_probabilities_sum_to_one(server) -> None:
    body = {"model": CHAT, "question": "2+2?", "choices": ["3", "4", "5", "22"], "attributes": {"complexity": 1}}
    result = post(server, "/v1/mcq", body).json()
    probabilities = result["probabilities"]
    assert list(probabilities) == ["A", "B", "C", "D"]
    assert math.isclose(sum(probabilities.values()), 1.0, abs_tol=1e-6)
    assert result["answer"] == max(probabilities, key=probabilities.get)
    assert result["index"] == "ABCD".index(result["answer"]) and result["attributes"]["complexity"] == 1


def test_mcq_batch_and_explanation(server) -> None:
    items = [{"question": "Pick one", "choices": ["x", "y"]}, {"question": "Q", "choices": list("abcde"), "context": "C"}]
    result = post(server, "/v1/mcq", {"model": RAW, "items": items, "explain": True, "explain_max_tokens": 6}).json()
    assert result["object"] == "mcq.batch" and len(result["results"]) == 2
    assert [len(r["probabilities"]) for r in result["results"]] == [2, 5]
    assert all(isinstance(r["explanation"], str) for r in result["results"])
    assert 0 < result["usage"]["completion_tokens"] <= 12


def test_concurrent_requests_are_batched_and_metered(server) -> None:
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            body = {"model": CHAT, "messages": HELLO, "max_tokens": 24, "ignore_eos": True}
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(6)))

    assert all(r.status_code == 200 for r in asyncio.run(fire()))
    text = httpx.get(server.url + "/metrics").text
    steps = metric_value(text, "steerserve:iteration_batch_size_count", model_name=CHAT)
    single = metric_value(text, "steerserve:iteration_batch_size_bucket", model_name=CHAT, le="1.0")
    assert steps > single, "no decode step ever ran more than one sequence"
    assert metric_value(text, "steerserve:time_to_first_token_seconds_count", model_name=CHAT) >= 6
    assert metric_value(text, "steerserve:e2e_request_latency_seconds_count", model_name=CHAT) >= 6
    assert metric_value(text, "steerserve:inter_token_latency_seconds_count", model_name=CHAT) > 0
    assert metric_value(text, "steerserve:generation_tokens_total", model_name=CHAT) >= 6 * 24
    assert metric_value(text, "steerserve:model_weight_bytes", model_name=CHAT, precision="bf16") > 100_000
    assert metric_value(text, "steerserve:requests_total", model_name=CHAT, status="200") >= 6
    assert metric_value(text, "process_resident_memory_bytes") > 0


# ---- errors: a 4xx naming the field, never a 500 ------------------------------

BAD_REQUESTS = [
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "attributes": {"verbose": 1}}, 400, "attributes.verbose"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "attributes": {"verbosity": 5}}, 400, "attributes.verbosity"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "attributes": {"humor": 2.5}}, 400, "attributes.humor"),
    ("/v1/chat/completions", {"model": CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": HELLO}, 400, "model"),
    ("/v1/chat/completions", {"model": "nope:bf16", "messages": HELLO}, 404, "model"),
    ("/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": "hello " * 600}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "temperature": 9}, 400, "temperature"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "presence_penalty": -3}, 400, "presence_penalty"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "repetition_penalty": 5e-324}, 400, "repetition_penalty"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"model": CHAT, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/mcq", {"model": CHAT, "question": "q", "choices": ["only"]}, 400, "choices"),
    ("/v1/mcq", {"model": CHAT, "question": "q", "choices": ["a", "b"], "items": [{"question": "q", "choices": ["a", "b"]}]}, 400, None),
    ("/v1/mcq", {"model": CHAT, "items": [{"question": "q", "choices": ["a", ""]}]}, 400, "items.0.choices"),
    ("/v1/mcq", {"model": CHAT, "question": "q", "choices": ["a", "b"], "attributes": {"complexity": 7}}, 400, "attributes.complexity"),
    ("/v1/render", {"model": CHAT}, 400, None),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "verbosity": 4}, 400, "verbosity"),
    ("/v1/chat/completions", {"model": CHAT, "messages": HELLO, "verbosity": "low"}, 400, "verbosity"),
    ("/v1/completions", {"model": CHAT, "prompt": "x", "complexity": 0}, 400, "complexity"),
    ("/v1/mcq", {"model": CHAT, "question": "q", "choices": ["a", "b"], "helpfulness": 4}, 400, "helpfulness"),
    ("/v1/render", {"model": CHAT, "prompt": "x", "humor": 1}, 400, "humor"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_naming_the_field(server, path, body, status, param) -> None:
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'{"model": 3, "messages": "x"}', "\xff".encode("latin-1")])
def test_malformed_bodies_are_400_not_500(server, raw: bytes) -> None:
    response = httpx.post(
        server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_openai_sdk_raises_typed_errors(client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="verbosity"):
        client.chat.completions.create(model=CHAT, messages=HELLO, extra_body={"attributes": {"verbosity": 9}})
    with pytest.raises(openai.BadRequestError, match='verbosity: sliders go in "attributes"'):
        client.chat.completions.create(model=CHAT, messages=HELLO, extra_body={"verbosity": 4})


def test_errors_are_counted_per_model(server) -> None:
    post(server, "/v1/chat/completions", {"model": CHAT, "messages": HELLO, "attributes": {"verbosity": 9}})
    text = httpx.get(server.url + "/metrics").text
    assert metric_value(text, "steerserve:requests_total", model_name=CHAT, status="400") >= 1
    assert metric_value(text, "steerserve:model_weight_bytes", model_name=RAW) > 0
