"""Quantized tiny variants, made once per session by the real ``steerserve quantize`` command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from quant_helpers import quantize


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model with hidden size 128, so GPTQ / compressed-tensors groups of 128 fit."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("qsource") / "tiny", hidden_size=128)


@pytest.fixture(scope="session")
def transformers_variants(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp16 (cast), and int8 / nf4 (bitsandbytes) when bitsandbytes is installed."""
    root = tmp_path_factory.mktemp("qvariants")
    precisions = ["fp16"] + (["int8", "nf4"] if importlib.util.find_spec("bitsandbytes") else [])
    made = {}
    for precision in precisions:
        assert quantize(tiny_source, precision, root / precision) == 0, precision
        made[precision] = root / precision
    return made
