"""Shared fixtures: tiny real models built locally (no hub, no default model)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402

# `steerserve serve` torch.compiles vLLM models by default (~1-2 min per model on CPU, cached per model);
# every test builds its own tiny model, so servers started here (in process or as subprocesses) run eagerly.
os.environ.setdefault("STEERSERVE_ENFORCE_EAGER", "true")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a ChatML template (steering method: instructions)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_raw_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama without a chat template (steering method: steerlm)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-raw"), chat_template=False, seed=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.gpu`` tests need CUDA: skip them, saying why, where torch sees no GPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False (CPU build or no device)")
    for item in gpu_items:
        item.add_marker(skip)
