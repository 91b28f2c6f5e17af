"""Send the planned requests on schedule and time each from its SSE stream (TTFT, inter-token gaps, end to end).

    records, wall = asyncio.run(run_load(plan, times, concurrency=8, max_duration=60))

Timing is taken where the client sees it: the first content chunk is the first
token, the gaps between later content chunks are the inter-token latencies, and
the output token count is the server's ``usage`` (a chunk may carry several
tokens when the server coalesces them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx
from tqdm import tqdm

from steerserve.clients.client import SteerAPIError, chat_body, check, parse_sse

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """One variant under load: a model id on a server."""

    model: str
    url: str

    @property
    def label(self) -> str:
        return self.model


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    """One request of the run, decided before anything is sent."""

    index: int
    target: Target
    prompt: str
    attributes: Mapping[str, int] | None
    max_tokens: int
    ignore_eos: bool = False


@dataclasses.dataclass
class RequestRecord:
    """What happened to one request; times in seconds, ``start`` from the beginning of the run."""

    index: int
    variant: str
    attributes: dict[str, int] | None
    sent: bool = False
    start: float = 0.0
    success: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    output_chars: int = 0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT); None for one-token answers."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def send(http: httpx.AsyncClient, request: PlannedRequest, record: RequestRecord) -> None:
    """Stream one chat completion into ``record`` (errors are recorded, never raised)."""
    params: dict[str, Any] = {"max_tokens": request.max_tokens, "temperature": 0.0}
    if request.ignore_eos:
        params["ignore_eos"] = True
    body = chat_body(request.target.model, request.prompt, request.attributes, True, params)
    begin = time.perf_counter()
    last: float | None = None
    chars = 0
    try:
        async with http.stream("POST", request.target.url + "/v1/chat/completions", json=body) as response:
            if not response.is_success:
                await response.aread()
                check(response)
            async for line in response.aiter_lines():
                payload = parse_sse(line)
                if payload is None:
                    continue
                now = time.perf_counter()
                text = "".join((c.get("delta") or {}).get("content") or "" for c in payload.get("choices", []))
                if text:
                    if last is None:
                        record.ttft = now - begin
                    else:
                        record.itl.append(now - last)
                    last, chars = now, chars + len(text)
                if payload.get("usage"):
                    record.prompt_tokens = payload["usage"]["prompt_tokens"]
                    record.output_tokens = payload["usage"]["completion_tokens"]
        record.e2e, record.output_chars, record.success = time.perf_counter() - begin, chars, True
    except (SteerAPIError, httpx.HTTPError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:300]


async def _one(http: httpx.AsyncClient, request: PlannedRequest, at: float, origin: float, stop_at: float,
               limit: asyncio.Semaphore, record: RequestRecord, bar: tqdm) -> None:
    """Wait for the send time and a free slot; past ``stop_at`` nothing new is sent."""
    await asyncio.sleep(max(0.0, origin + at - time.perf_counter()))
    async with limit:
        record.start = time.perf_counter() - origin
        if record.start > stop_at:
            return
        record.sent = True
        await send(http, request, record)
    bar.update(1)


async def run_load(plan: list[PlannedRequest], times: list[float], *, concurrency: int | None,
                   max_duration: float, drain_timeout: float = 60.0, api_key: str | None = None,
                   progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Run ``plan`` (request i sent at ``times[i]``) under a concurrency cap; the records and the wall time.

    Requests not yet sent when ``max_duration`` is reached are dropped (not counted); requests still running
    ``drain_timeout`` after that are cancelled and counted as failures, so a run always ends on time.
    """
    records = [RequestRecord(r.index, r.target.label, dict(r.attributes) if r.attributes else None) for r in plan]
    limit = asyncio.Semaphore(concurrency or len(plan) or 1)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connections = httpx.Limits(max_connections=concurrency or 1000, max_keepalive_connections=concurrency or 100)
    scheduled = [(request, at, record) for request, at, record in zip(plan, times, records, strict=True)
                 if at <= max_duration]
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), limits=connections, headers=headers) as http:
        with tqdm(total=len(scheduled), desc="load", unit="req", disable=not progress) as bar:
            origin = time.perf_counter()
            tasks = [asyncio.create_task(_one(http, request, at, origin, max_duration, limit, record, bar))
                     for request, at, record in scheduled]
            _, pending = await asyncio.wait(tasks, timeout=max_duration + drain_timeout) if tasks else (set(), set())
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            wall = time.perf_counter() - origin
    sent = [record for record in records if record.sent]
    for record in sent:
        if not record.success and record.error is None:
            record.error = "cancelled: run time limit reached"
    if len(sent) < len(plan):
        logger.warning("%d of %d requests not sent: --max-duration reached", len(plan) - len(sent), len(plan))
    return sent, wall
