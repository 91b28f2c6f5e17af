"""A bounded soak: 16 concurrent streams for 30 s on loopback, zero failures, bounded RSS growth."""

from __future__ import annotations

import ctypes
import gc
import json
import tracemalloc
from pathlib import Path

import httpx
from live_server import serve_models
from test_api import metric_value

from steerserve.clients.loadgen.cli import main as load

SOAK_SECONDS = 30
# Two bounds. Python objects (what a per-request leak in our code would be: a dict of finished
# requests, a list of deltas) are traced exactly and must stay flat. RSS also counts native memory:
# oneDNN's per-shape kernel cache and glibc arenas grow with every new batch shape (~250 KiB per
# request early on, up to their caps), so its bound is loose and only catches gross leaks.
PY_HEAP_GROWTH_LIMIT = 16 * 2**20
RSS_GROWTH_LIMIT = 768 * 2**20


def trimmed_rss(url: str) -> float:
    """Process RSS after returning freed heap pages to the OS, so it reflects live memory."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return metric_value(httpx.get(url + "/metrics").text, "process_resident_memory_bytes")


def run_load(url: str, output: Path, seconds: float, prompts: int) -> dict:
    code = load(["--url", url, "--model", "tiny:bf16", "--prompts", "mt_bench", "--num-prompts", str(prompts),
                 "--max-tokens", "32", "--concurrency", "16", "--sweep", "verbosity=0,2,4",
                 "--max-duration", str(seconds), "--output", str(output), "--no-progress"])
    assert code == 0
    return json.loads((output / "load.json").read_text())["summary"]["variants"]["tiny:bf16"]


def test_soak_has_no_failures_and_bounded_memory(tiny_model_dir: Path, tmp_path: Path) -> None:
    with serve_models({"tiny": tiny_model_dir}, "transformers", max_num_seqs=16, max_model_len=2048) as server:
        run_load(server.url, tmp_path / "warmup", 10, 100_000)  # allocator and caches reach steady state
        tracemalloc.start(1)
        try:
            before, heap_before = trimmed_rss(server.url), tracemalloc.get_traced_memory()[0]
            stats = run_load(server.url, tmp_path / "soak", SOAK_SECONDS, 100_000)
            gc.collect()
            heap_growth = tracemalloc.get_traced_memory()[0] - heap_before
            growth = trimmed_rss(server.url) - before
        finally:
            tracemalloc.stop()
        metrics = httpx.get(server.url + "/metrics").text
    report = {"requests": stats["requests"], "failures": stats["failures"], "rss_growth_mib": growth / 2**20,
              "python_heap_growth_mib": heap_growth / 2**20,
              "server_5xx": metric_value(metrics, "steerserve:requests_total", status="500")}
    (tmp_path / "soak.json").write_text(json.dumps(report))
    print(f"soak: {report}")
    assert stats["requests"] > 50 and stats["failures"] == 0, report
    assert report["server_5xx"] == 0, report
    assert heap_growth < PY_HEAP_GROWTH_LIMIT, report
    assert growth < RSS_GROWTH_LIMIT, report
