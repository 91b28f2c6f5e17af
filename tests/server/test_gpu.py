"""The vLLM engine on a CUDA GPU (official ``vllm``, ``pip install -e '.[gpu,dev,train]'``).

Skipped without CUDA (tests/conftest.py skips every ``@pytest.mark.gpu`` test, with the reason).
One server: the tiny model at bf16 with a LoRA adapter on it, and the same checkpoint
quantized by vLLM to fp8 as it loads, tensor parallel size 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from adapter_helpers import make_adapter
from live_server import LiveServer

from steerserve.server.app import create_app
from steerserve.server.settings import ServerSettings, VariantSpec

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]
QUESTION = {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"]}


@pytest.fixture(scope="module")
def gpu_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("gpu") / "sft-lora", seed=1)
    share = {"gpu_memory_utilization": 0.3}  # two engines on one GPU, instead of vLLM's default 0.9 each
    specs = [
        VariantSpec(path=str(tiny_model_dir), name="tiny", engine_args=share),
        VariantSpec(path=str(tiny_model_dir), name="tiny", precision="fp8", engine_args=share),
        VariantSpec(path=str(adapter), base="tiny:bf16"),
    ]
    settings = ServerSettings(models=specs, engine="vllm", max_model_len=512, tensor_parallel_size=1,
                              cache_dir=tmp_path_factory.mktemp("cache"))
    with LiveServer(create_app(settings), ready_timeout=600) as live:
        yield live


def test_fp8_and_lora_variants_are_served_on_cuda(gpu_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=gpu_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    cards = {card.id: card.model_dump() for card in client.models.list().data}
    assert set(cards) == {"tiny:bf16", "tiny:fp8", "sft-lora:bf16"}
    assert cards["tiny:fp8"]["engine"] == "vllm" and cards["tiny:fp8"]["precision"] == "fp8"
    assert cards["tiny:fp8"]["weight_bytes"] < cards["tiny:bf16"]["weight_bytes"]
    assert cards["sft-lora:bf16"]["served_as"] == "lora"
    for model in cards:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                               max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens >= 1
        response = httpx.post(gpu_server.url + "/v1/mcq", json={"model": model, **QUESTION}, timeout=120)
        assert sum(response.json()["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_kv_cache_gauge_reports_the_gpu_cache(gpu_server: LiveServer) -> None:
    text = httpx.get(gpu_server.url + "/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("steerserve:kv_cache_usage_perc{")]
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)  # one per engine: bf16 (+ adapter), fp8
