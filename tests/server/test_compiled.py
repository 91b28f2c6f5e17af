"""`steerserve serve` torch.compiles its vLLM models by default: the compiled engine answers as the eager one.

The rest of the suite runs eagerly (``STEERSERVE_ENFORCE_EAGER=true`` in conftest) because every test model
would compile on its own; this module is the one place the default path runs: a compiled base with a LoRA
adapter on it, beside the same checkpoint pinned eager with ``engine_args.enforce_eager=true``, one server.
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

pytestmark = pytest.mark.vllm

PROMPTS = ["Hello world! How are you today?", "Name three colours.", "Why is the sky blue? Explain briefly."]
QUESTION = {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"]}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("compiled")
    adapter = make_adapter(tiny_model_dir, root / "lora", seed=4)
    specs = [
        VariantSpec.parse(f"{tiny_model_dir},name=compiled,precision=fp32"),
        VariantSpec.parse(f"{adapter},name=compiled-lora,base=compiled"),
        VariantSpec.parse(f"{tiny_model_dir},name=eager,precision=fp32,engine_args.enforce_eager=true"),
    ]
    settings = ServerSettings(models=specs, engine="vllm", enforce_eager=False, max_model_len=512, kv_cache_gib=1,
                              cache_dir=root / "cache")
    with LiveServer(create_app(settings), ready_timeout=600) as live:
        yield live


def greedy(client: openai.OpenAI, model: str, prompt: str, *, stream: bool = False) -> str:
    messages = [{"role": "user", "content": prompt}]
    if stream:
        chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                                stream=True)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    assert reply.usage.completion_tokens >= 1
    return reply.choices[0].message.content


def mcq(url: str, model: str) -> dict[str, float]:
    response = httpx.post(url + "/v1/mcq", json={"model": model, **QUESTION}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["probabilities"]


def test_the_compiled_engine_answers_as_the_eager_one(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for prompt in PROMPTS:  # fp32 both sides: fused kernels round differently, but not enough to flip greedy
        compiled = greedy(client, "compiled:fp32", prompt)
        assert compiled == greedy(client, "eager:fp32", prompt), prompt
        assert greedy(client, "compiled:fp32", prompt, stream=True) == compiled
    assert mcq(server.url, "compiled:fp32") == pytest.approx(mcq(server.url, "eager:fp32"), abs=1e-3)


def test_a_lora_adapter_runs_on_the_compiled_base(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    base = [greedy(client, "compiled:fp32", prompt) for prompt in PROMPTS]
    adapted = [greedy(client, "compiled-lora:fp32", prompt) for prompt in PROMPTS]
    assert adapted != base
    probs = mcq(server.url, "compiled-lora:fp32")
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert max(abs(probs[k] - v) for k, v in mcq(server.url, "compiled:fp32").items()) > 0.01
