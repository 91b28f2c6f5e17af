"""Typed HTTP clients for a steerserve server: chat (plain and streamed), MCQ, models, health.

    with SteerClient("http://127.0.0.1:8000") as client:
        reply = client.chat("smollm2-135m-instruct:bf16", "What is a black hole?", attributes={"verbosity": 1})

:class:`SteerClient` (httpx, blocking) and :class:`AsyncSteerClient` (httpx,
asyncio) share every request body and response parser below, so the two cannot
drift apart. Results are the server's own wire types from
:mod:`steerserve.server.protocol`; errors raise :class:`SteerAPIError` carrying
the server's OpenAI-style ``status``/``param``/``code``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import httpx

from steerserve.server.protocol import ChatCompletionChunk, ChatCompletionResponse, MCQResponse, ModelList

Messages = str | Sequence[Mapping[str, Any]]
DEFAULT_TIMEOUT = 600.0


class SteerAPIError(Exception):
    """An error answer of the server (or an error frame mid-stream), with its OpenAI-style fields."""

    def __init__(self, status: int, message: str, *, type_: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(f"{status} {code or type_ or 'error'}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    @classmethod
    def from_body(cls, status: int, body: Any, fallback: str = "") -> SteerAPIError:
        """Parse ``{"error": {...}}``; a body of another shape (a proxy's HTML page) is kept as the message."""
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(status, fallback or str(body))
        return cls(status, str(error.get("message", "")), type_=error.get("type"), param=error.get("param"),
                   code=error.get("code"))


@dataclasses.dataclass(frozen=True)
class Health:
    """``GET /health``: ``ok`` once every variant is loaded; per-model states otherwise."""

    ok: bool
    status: str
    models: dict[str, str]


# ---- request bodies and response parsing (shared by both clients) -------------------------------


def as_messages(messages: Messages) -> list[dict[str, Any]]:
    """A bare string is one user turn."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def chat_body(model: str, messages: Messages, attributes: Mapping[str, int] | None, stream: bool,
              params: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions body; ``params`` are OpenAI sampling fields (``max_tokens``, ``temperature``...)."""
    body: dict[str, Any] = {"model": model, "messages": as_messages(messages), **params}
    if attributes is not None:
        body["attributes"] = dict(attributes)
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    return body


_ITEM_FIELDS = ("question", "choices", "context")


def _item(item: Mapping[str, Any]) -> dict[str, Any]:
    """Only the wire fields of an MCQ row (loaders' rows also carry ``answer``, ``explanation``)."""
    return {k: item[k] for k in _ITEM_FIELDS if item.get(k) is not None}


def mcq_body(model: str, question: str, choices: Sequence[str], context: str | None,
             attributes: Mapping[str, int] | None, explain: bool) -> dict[str, Any]:
    """The single-question form."""
    body = {"model": model, "explain": explain, **_item({"question": question, "choices": list(choices),
                                                         "context": context})}
    if attributes is not None:
        body["attributes"] = dict(attributes)
    return body


def mcq_batch_body(model: str, items: Sequence[Mapping[str, Any]],
                   attributes: Mapping[str, int] | None) -> dict[str, Any]:
    """The batch form (``items``): answers come back as ``results``, even for one item."""
    body: dict[str, Any] = {"model": model, "items": [_item(item) for item in items]}
    if attributes is not None:
        body["attributes"] = dict(attributes)
    return body


def check(response: httpx.Response) -> Any:
    """The JSON body of a 2xx answer; :class:`SteerAPIError` otherwise."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and body is not None:
        return body
    raise SteerAPIError.from_body(response.status_code, body, fallback=response.text[:500])


def parse_sse(line: str) -> dict[str, Any] | None:
    """One SSE line → its JSON payload; None for blank lines, comments and ``[DONE]``.

    An error frame (``{"error": ...}``) raises, so a stream that fails midway is never mistaken for a short answer.
    """
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    payload = json.loads(data)
    if "error" in payload:
        raise SteerAPIError.from_body(200, payload)
    return payload


def _health(response: httpx.Response) -> Health:
    body = response.json()
    return Health(ok=response.status_code == 200, status=body.get("status", ""), models=body.get("models", {}))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _base(url: str) -> str:
    """Accept both ``http://host:port`` and ``http://host:port/v1`` (what the openai SDK is given)."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


# ---- the clients ---------------------------------------------------------------------------------


class SteerClient:
    """Blocking client; use as a context manager (or call :meth:`close`)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = _base(base_url)
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> SteerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def chat(self, model: str, messages: Messages, *, attributes: Mapping[str, int] | None = None,
             **params: Any) -> ChatCompletionResponse:
        """One chat completion; ``attributes`` are the sliders (missing ones take the defaults)."""
        body = chat_body(model, messages, attributes, False, params)
        return ChatCompletionResponse.model_validate(check(self._http.post("/v1/chat/completions", json=body)))

    def chat_stream(self, model: str, messages: Messages, *, attributes: Mapping[str, int] | None = None,
                    **params: Any) -> Iterator[ChatCompletionChunk]:
        """Streamed chat chunks; the first carries the applied attributes, the last the usage."""
        body = chat_body(model, messages, attributes, True, params)
        with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if not response.is_success:
                response.read()
                check(response)
            for line in response.iter_lines():
                payload = parse_sse(line)
                if payload is not None:
                    yield ChatCompletionChunk.model_validate(payload)

    def mcq(self, model: str, question: str, choices: Sequence[str], *, context: str | None = None,
            attributes: Mapping[str, int] | None = None, explain: bool = False) -> MCQResponse:
        """One multiple-choice question, scored from the answer-letter probabilities."""
        body = mcq_body(model, question, choices, context, attributes, explain)
        return MCQResponse.model_validate(check(self._http.post("/v1/mcq", json=body)))

    def mcq_batch(self, model: str, items: Sequence[Mapping[str, Any]], *,
                  attributes: Mapping[str, int] | None = None) -> MCQResponse:
        """Several questions in one request (``results`` in order); items are ``{question, choices, context?}``."""
        body = mcq_batch_body(model, items, attributes)
        return MCQResponse.model_validate(check(self._http.post("/v1/mcq", json=body)))

    def models(self) -> ModelList:
        return ModelList.model_validate(check(self._http.get("/v1/models")))

    def render(self, model: str, messages: Messages, *, attributes: Mapping[str, int] | None = None) -> dict[str, Any]:
        """The exact prompt a chat request becomes (for checking steering)."""
        body = {"model": model, "messages": as_messages(messages), "attributes": dict(attributes or {})}
        return check(self._http.post("/v1/render", json=body))

    def health(self) -> Health:
        return _health(self._http.get("/health"))

    def metrics(self) -> str:
        """Prometheus text of ``/metrics``."""
        response = self._http.get("/metrics")
        if not response.is_success:
            check(response)
        return response.text


class AsyncSteerClient:
    """The asyncio twin of :class:`SteerClient` (same bodies, same results)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = _base(base_url)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_headers(api_key), timeout=timeout)

    async def __aenter__(self) -> AsyncSteerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def chat(self, model: str, messages: Messages, *, attributes: Mapping[str, int] | None = None,
                   **params: Any) -> ChatCompletionResponse:
        body = chat_body(model, messages, attributes, False, params)
        response = await self._http.post("/v1/chat/completions", json=body)
        return ChatCompletionResponse.model_validate(check(response))

    async def chat_stream(self, model: str, messages: Messages, *, attributes: Mapping[str, int] | None = None,
                          **params: Any) -> AsyncIterator[ChatCompletionChunk]:
        body = chat_body(model, messages, attributes, True, params)
        async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if not response.is_success:
                await response.aread()
                check(response)
            async for line in response.aiter_lines():
                payload = parse_sse(line)
                if payload is not None:
                    yield ChatCompletionChunk.model_validate(payload)

    async def mcq(self, model: str, question: str, choices: Sequence[str], *, context: str | None = None,
                  attributes: Mapping[str, int] | None = None, explain: bool = False) -> MCQResponse:
        body = mcq_body(model, question, choices, context, attributes, explain)
        return MCQResponse.model_validate(check(await self._http.post("/v1/mcq", json=body)))

    async def mcq_batch(self, model: str, items: Sequence[Mapping[str, Any]], *,
                        attributes: Mapping[str, int] | None = None) -> MCQResponse:
        body = mcq_batch_body(model, items, attributes)
        return MCQResponse.model_validate(check(await self._http.post("/v1/mcq", json=body)))

    async def models(self) -> ModelList:
        return ModelList.model_validate(check(await self._http.get("/v1/models")))

    async def health(self) -> Health:
        return _health(await self._http.get("/health"))
