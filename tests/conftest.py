"""Shared fixtures: tiny real models built locally (no hub, no default model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a ChatML template (steering method: instructions)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_raw_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama without a chat template (steering method: steerlm)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-raw"), chat_template=False, seed=1)


