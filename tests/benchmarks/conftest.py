"""A real server over the tiny model for benchmarks given ``--url`` (transformers engine: starts in a second)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import LiveServer, serve_models


@pytest.fixture(scope="module")
def bench_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    with serve_models({"tiny": tiny_model_dir}, "transformers") as live:
        yield live
