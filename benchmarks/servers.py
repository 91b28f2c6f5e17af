"""The servers a benchmark measures: ``steerserve serve`` subprocesses it starts itself, or one already running.

    for target in iterate_targets(url=None, models=[], variants=["default", "default,engine=transformers"]):
        ...  # target.url, target.model, target.label; the server stops when the loop moves on

Each started variant gets its own process on a kernel-assigned loopback port,
one at a time, so variants never share the two cores and each one's memory is
its own. :class:`MemorySampler` polls the server's ``/metrics`` for the
process-tree RSS (peak) and the variant's weight bytes while a benchmark runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

logger = logging.getLogger(__name__)
DEFAULT_VARIANTS = ("default", "default,engine=transformers")
_SAMPLE = re.compile(r'^(steerserve:[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$')


@dataclasses.dataclass(frozen=True)
class BenchTarget:
    """A served variant to measure: its server, id, engine and checkpoint folder."""

    url: str
    model: str
    engine: str
    precision: str
    root: str
    spec: str | None = None
    """The ``--model`` spec the benchmark started it with; None for a server it was given."""
    reading_level_guidance: float = 0.0
    """How hard the server pushes the complexity slider while decoding (its model card; 0: not at all)."""
    verbosity_guidance: float = 0.0
    """How hard the server pushes the verbosity slider (the end-of-turn token) while decoding (its model card)."""
    loop_guard: int = 0
    """Copies in a row that end a looping answer on the server (its model card; 0: loops run to the cap)."""

    @property
    def label(self) -> str:
        return f"{self.model} ({self.engine})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(spec: str, port: int, extra: list[str] | None = None) -> subprocess.Popen:
    """``steerserve serve --model SPEC`` on ``127.0.0.1:port``, quiet; the caller stops it."""
    command = [sys.executable, "-m", "steerserve.cli", "serve", "--model", spec, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", *(extra or [])]
    return subprocess.Popen(command, env=dict(os.environ))


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    """Poll ``/health`` until 200; fail fast if the process dies or a model fails to load."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            response = httpx.get(url + "/health", timeout=5)
            if response.status_code == 200:
                return
            if response.json().get("status") == "failed":
                raise RuntimeError(f"a model failed to load: {response.text}")
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {timeout:.0f} s")


def model_cards(url: str) -> list[dict]:
    response = httpx.get(url + "/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"]


def _target(url: str, card: dict, spec: str | None) -> BenchTarget:
    return BenchTarget(url=url, model=card["id"], engine=card["engine"], precision=card["precision"],
                       root=card["root"], spec=spec, reading_level_guidance=card.get("reading_level_guidance", 0.0),
                       verbosity_guidance=card.get("verbosity_guidance", 0.0), loop_guard=card.get("loop_guard", 0))


@contextmanager
def serve_variant(spec: str, extra: list[str] | None = None) -> Iterator[list[BenchTarget]]:
    """Start one server for ``spec``, yield its variants, stop it (SIGTERM, then SIGKILL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logger.info("starting steerserve serve --model %s on %s", spec, url)
    process = start_server(spec, port, extra)
    try:
        wait_healthy(url, process)
        yield [_target(url, card, spec) for card in model_cards(url)]
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def iterate_targets(url: str | None, models: list[str], variants: list[str],
                    server_args: list[str] | None = None) -> Iterator[BenchTarget]:
    """The given server's models (all, or those named), else each variant spec on its own fresh server."""
    if url:
        from steerserve.clients.loadgen.cli import require_loopback

        url = require_loopback(url)
        cards = model_cards(url)
        wanted = models or [card["id"] for card in cards]
        by_id = {card["id"]: card for card in cards}
        missing = [m for m in wanted if m not in by_id]
        if missing:
            raise ValueError(f"{url} does not serve {', '.join(missing)}; it serves {', '.join(by_id)}")
        yield from (_target(url, by_id[m], None) for m in wanted)
        return
    for spec in variants or list(DEFAULT_VARIANTS):
        with serve_variant(spec, server_args) as targets:
            yield from targets


def parse_metrics(text: str) -> dict[str, list[tuple[str, float]]]:
    """``steerserve:*`` samples by metric name: ``[(labels, value), ...]``."""
    samples: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match:
            samples.setdefault(match.group(1), []).append((match.group(2) or "", float(match.group(3))))
    return samples


class MemorySampler:
    """Background polling of ``/metrics`` during a measurement: peak process-tree RSS, the variant's weight bytes.

    The sampler shares the 2 cores with the engine it measures, so it must cost next to nothing: one kept-open
    connection (a fresh ``httpx.get`` builds a client and an SSL context, ~50 ms of CPU each time) and a scrape
    a second (RSS is flat once the engine has allocated its KV cache). Polled at 4 Hz with fresh clients it
    took a fifth of a core and showed up as "server overhead" (benchmarks/NOTES.md).
    """

    def __init__(self, url: str, model: str, interval: float = 1.0) -> None:
        self.url, self.model, self.interval = url, model, interval
        self.peak_rss_bytes = 0
        self.weight_bytes: int | None = None
        self._http = httpx.Client(base_url=url, timeout=10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()
        self._http.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            samples = parse_metrics(self._http.get("/metrics").text)
        except httpx.HTTPError as exc:
            logger.debug("metrics scrape failed: %s", exc)
            return
        for _, value in samples.get("steerserve:process_tree_resident_memory_bytes", []):
            self.peak_rss_bytes = max(self.peak_rss_bytes, int(value))
        for labels, value in samples.get("steerserve:model_weight_bytes", []):
            if f'model_name="{self.model}"' in labels:
                self.weight_bytes = int(value)
