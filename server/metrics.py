"""Prometheus metrics per variant, named after vLLM's (``steerserve:`` instead of ``vllm:``).

Each app owns its registry, so several servers (tests) live in one process.
Every series carries ``model_name`` = the variant id; the same names whichever
engine serves it. ``steerserve:kv_cache_usage_perc`` (vLLM's ``vllm:kv_cache_usage_perc``,
a 0-1 fraction) has samples only for engines with a preallocated KV cache (vLLM);
LoRA adapters share their base's cache, so only the base reports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Buckets from vLLM's own histograms: CPU latencies spread from milliseconds to minutes.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
LABEL = ["model_name"]


class _LiveGauges(Collector):
    """Gauges read at scrape time: queue depths from the engines, memory from the OS."""

    def __init__(self, variants: Callable[[], Iterable[object]]) -> None:
        self._variants = variants

    def collect(self) -> Iterable[GaugeMetricFamily]:
        running = GaugeMetricFamily("steerserve:num_requests_running", "Sequences in the engine's batch.", labels=LABEL)
        waiting = GaugeMetricFamily("steerserve:num_requests_waiting", "Requests queued in the engine.", labels=LABEL)
        weights = GaugeMetricFamily(
            "steerserve:model_weight_bytes",
            "Bytes of the variant's weights resident in memory.",
            labels=["model_name", "precision", "engine"],
        )
        kv_cache = GaugeMetricFamily(
            "steerserve:kv_cache_usage_perc", "Fraction of the engine's KV cache in use (0-1).", labels=LABEL
        )
        for v in self._variants():
            engine = v.engine  # type: ignore[attr-defined]
            running.add_metric([v.id], engine.running if v.ready else 0)  # type: ignore[attr-defined]
            waiting.add_metric([v.id], engine.waiting if v.ready else 0)  # type: ignore[attr-defined]
            if v.ready:  # type: ignore[attr-defined]
                weights.add_metric([v.id, v.precision.value, v.engine_name], engine.weight_bytes())  # type: ignore[attr-defined]
                if engine.kv_cache_usage is not None:
                    kv_cache.add_metric([v.id], engine.kv_cache_usage)  # type: ignore[attr-defined]
        yield from (running, waiting, weights, kv_cache, _tree_rss())


def _tree_rss() -> GaugeMetricFamily:
    """RSS of this process plus its children (vLLM's engine core and workers run as children)."""
    me = psutil.Process(os.getpid())
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    family = GaugeMetricFamily(
        "steerserve:process_tree_resident_memory_bytes", "RSS of the server and its engine processes."
    )
    family.add_metric([], total)
    return family


class ServerMetrics:
    """The metrics one server exports at /metrics."""

    def __init__(self, variants: Callable[[], Iterable[object]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        r.register(_LiveGauges(variants))
        self.requests = Counter(
            "steerserve:requests", "HTTP requests by model and status code.", ["model_name", "status"], registry=r
        )
        self.finished = Counter(
            "steerserve:request_success", "Finished generations by finish reason.", [*LABEL, "finished_reason"], registry=r
        )
        self.prompt_tokens = Counter("steerserve:prompt_tokens", "Prefill tokens processed.", LABEL, registry=r)
        self.generation_tokens = Counter("steerserve:generation_tokens", "Tokens generated.", LABEL, registry=r)
        self.ttft = Histogram(
            "steerserve:time_to_first_token_seconds", "Time to first token.", LABEL, buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "steerserve:inter_token_latency_seconds", "Time between streamed tokens.", LABEL, buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "steerserve:e2e_request_latency_seconds", "Request latency, arrival to last token.", LABEL,
            buckets=E2E_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "steerserve:request_queue_time_seconds", "Time waiting before the engine scheduled the request.", LABEL,
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "steerserve:iteration_batch_size", "Sequences decoded together per engine step.", LABEL,
            buckets=BATCH_BUCKETS, registry=r,
        )

    def count_request(self, model_name: str, status: int) -> None:
        self.requests.labels(model_name=model_name or "", status=str(status)).inc()

    def step_observer(self, model_name: str) -> Callable[[int], None]:
        """The ``on_step`` callback an engine calls with each decode step's batch size."""
        histogram = self.batch_size.labels(model_name=model_name)
        return lambda size: histogram.observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
