"""Quantized tiny variants, made once per session by the real ``steerserve quantize`` command, and served live.

Every quantization test module builds its source and variants, and serves them, through
the factories here, so a GGUF, bitsandbytes or vLLM variant is made and checked the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from live_server import LiveServer
from quant_helpers import quantize

Served = tuple[str, openai.OpenAI, dict[str, dict[str, Any]]]
"""A live server's URL, an OpenAI client on it, and each variant's model card keyed by precision."""


@pytest.fixture(scope="session")
def build_source(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``build_source(hidden_size)``: a tiny chat model; quantization methods need row widths they can group."""
    from tiny_model import build_tiny_model

    def build(hidden_size: int) -> Path:
        return build_tiny_model(tmp_path_factory.mktemp(f"qsource{hidden_size}") / "tiny", hidden_size=hidden_size)

    return build


@pytest.fixture(scope="session")
def quantize_all(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path, Iterable[str]], dict[str, Path]]:
    """``quantize_all(source, precisions)``: precision -> variant folder, each made by the real command."""

    def make(source: Path, precisions: Iterable[str]) -> dict[str, Path]:
        root = tmp_path_factory.mktemp("qvariants")
        made = {}
        for precision in precisions:
            assert quantize(source, precision, root / precision) == 0, precision
            made[precision] = root / precision
        return made

    return make


@pytest.fixture(scope="session")
def tiny_source(build_source: Callable[[int], Path]) -> Path:
    """Hidden size 128, so GPTQ / compressed-tensors groups of 128 fit."""
    return build_source(128)


@pytest.fixture(scope="session")
def transformers_variants(tiny_source: Path, quantize_all: Callable[..., dict[str, Path]]) -> dict[str, Path]:
    """fp16 (cast), and int8 / nf4 (bitsandbytes) when bitsandbytes is installed."""
    return quantize_all(tiny_source, ["fp16"] + (["int8", "nf4"] if importlib.util.find_spec("bitsandbytes") else []))


@contextlib.contextmanager
def _serve(variants: dict[str, Path], engine: str | None = None) -> Iterator[Served]:
    """Serve ``variants`` (on ``engine``, else the server's default, transformers) and check their cards.

    Each variant must be listed once, as ``tiny:<precision>``, on that engine and at that precision.
    """
    from steerserve.server.app import create_app
    from steerserve.server.settings import ServerSettings, VariantSpec

    specs = [VariantSpec(path=str(path), engine=engine) for path in variants.values()]
    settings = ServerSettings(models=specs, engine="transformers", max_model_len=512)
    with LiveServer(create_app(settings)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        listed = {card.id: card.model_dump() for card in client.models.list().data}
        assert set(listed) == {f"tiny:{precision}" for precision in variants}
        cards = {precision: listed[f"tiny:{precision}"] for precision in variants}
        for precision, card in cards.items():
            assert card["engine"] == (engine or settings.engine) and card["precision"] == precision
        yield server.url, client, cards


@pytest.fixture
def serve_variants() -> Callable[..., contextlib.AbstractContextManager[Served]]:
    """``with serve_variants(variants, engine) as (url, client, cards):`` a live server of the variants."""
    return _serve
