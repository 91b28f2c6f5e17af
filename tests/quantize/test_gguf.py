"""GGUF variants end to end: the real ``steerserve quantize`` command, llama.cpp vs transformers, the live API.

    python -m pytest tests/quantize/test_gguf.py -q
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from test_quantize_cli import MANIFEST_KEYS, check_chat_and_mcq

from steerserve.training.quantize.methods import dir_bytes

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
    reason="llama-cpp-python / gguf not installed (pip install -e '.[llamacpp]')",
)
PROMPTS = ["hello world", "the cat sat on the mat and", "<|im_start|>user\nWhat is two plus two?<|im_end|>"]


@pytest.fixture(scope="module")
def gguf_source(build_source: Callable[[int], Path]) -> Path:
    """Hidden size 256: Q4_K_M's 256-wide super-blocks fit every matrix row."""
    return build_source(256)


@pytest.fixture(scope="module")
def gguf_variants(gguf_source: Path, quantize_all: Callable[..., dict[str, Path]]) -> dict[str, Path]:
    return quantize_all(gguf_source, ["gguf-q8_0", "gguf-q4_k_m"])


def test_manifests(gguf_variants: dict[str, Path]) -> None:
    sizes = {}
    for precision, path in gguf_variants.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert [k for k in MANIFEST_KEYS if k not in manifest] == [], precision
        assert manifest["precision"] == precision and manifest["quality"]["scored_with"] == "llama.cpp"
        assert (path / "model.gguf").is_file() and (path / "tokenizer.json").is_file()
        assert not list(path.glob("*.tmp")) and manifest["bytes"] == dir_bytes(path)
        assert "llama_cpp_python" in manifest["libraries"] and "gguf" in manifest["libraries"]
        variant = manifest["quality"]["variant"]
        assert variant["perplexity"] > 1 and variant["mcq_items"] == 6
        sizes[precision] = manifest["bytes"]
        ratio = manifest["quality"]["perplexity_ratio"]
        assert ratio == pytest.approx(1, abs=0.05 if precision == "gguf-q8_0" else 0.3), precision
    assert sizes["gguf-q4_k_m"] < sizes["gguf-q8_0"]


def test_q8_logits_match_transformers(gguf_source: Path, gguf_variants: dict[str, Path]) -> None:
    """Proves the q/k rope permutation and the vocabulary: same greedy token, log-probs within Q8 noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerserve.training.quantize.gguf import eval_prompt, last_logprobs, load_llama

    tokenizer = AutoTokenizer.from_pretrained(gguf_source)
    model = AutoModelForCausalLM.from_pretrained(gguf_source, dtype=torch.float32).eval()
    llama = load_llama(gguf_variants["gguf-q8_0"], n_ctx=128)
    try:
        for text in PROMPTS:
            ids = tokenizer(text)["input_ids"]
            with torch.inference_mode():
                expected = model(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1).numpy()
            eval_prompt(llama, ids)
            got = last_logprobs(llama)[: len(expected)]
            assert got.argmax() == expected.argmax(), text
            assert abs(got - expected).max() < 0.1, text
    finally:
        llama.close()


def test_llamacpp_engine_serves_gguf(gguf_variants: dict[str, Path], serve_variants: Callable[..., Any]) -> None:
    with serve_variants(gguf_variants, "llama.cpp") as (url, client, cards):
        for precision, path in gguf_variants.items():
            assert 0 < cards[precision]["weight_bytes"] < (path / "model.gguf").stat().st_size
            check_chat_and_mcq(url, client, cards[precision]["id"])
        _check_stream_and_seed(client, "tiny:gguf-q8_0")


def _check_stream_and_seed(client: openai.OpenAI, model: str) -> None:
    """Streamed text equals the non-streamed text; a seed reproduces a sampled reply; n choices arrive."""
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    pieces = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert pieces == whole.choices[0].message.content
    sampled = [client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=1.0,
                                              seed=7, n=2) for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    assert len(sampled[0].choices) == 2


def test_engine_args_reach_llama_cpp_and_unknown_ones_are_refused(gguf_variants: dict[str, Path]) -> None:
    """A variant's ``engine_args`` set llama.cpp's thread counts; a misspelt one fails the load, naming it."""
    import asyncio

    from steerserve.precision import Precision
    from steerserve.server.engines.base import EngineConfig, EngineError
    from steerserve.server.engines.llamacpp_engine import LlamaCppEngine

    path = str(gguf_variants["gguf-q8_0"])
    engine = LlamaCppEngine(EngineConfig(model=path, precision=Precision.GGUF_Q8_0, max_model_len=128,
                                         extra={"n_threads": 1, "n_threads_batch": 2, "max_waiting": 4}))
    asyncio.run(engine.start())
    try:
        assert (engine._llama.n_threads, engine._llama.n_threads_batch) == (1, 2)
    finally:
        asyncio.run(engine.shutdown())
    misspelt = LlamaCppEngine(EngineConfig(model=path, precision=Precision.GGUF_Q8_0, extra={"n_thread": 1}))
    with pytest.raises(EngineError, match="n_thread"):
        asyncio.run(misspelt.start())


def test_llamacpp_penalised_greedy_matches_transformers_processor(gguf_variants: dict[str, Path]) -> None:
    """The served penalised greedy reply = llama.cpp's own logits, transformers' repetition-penalty
    processor, argmax, token by token."""
    import asyncio

    from transformers import AutoTokenizer, RepetitionPenaltyLogitsProcessor

    from steerserve.precision import Precision
    from steerserve.server.engines.base import EngineConfig, EngineRequest, SamplingOptions
    from steerserve.server.engines.llamacpp_engine import LlamaCppEngine
    from steerserve.training.quantize.gguf import eval_prompt, last_logits, load_llama

    path = gguf_variants["gguf-q8_0"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode(PROMPTS[1])
    options = SamplingOptions(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.8)

    async def served() -> str:
        engine = LlamaCppEngine(EngineConfig(model=str(path), precision=Precision.GGUF_Q8_0, max_model_len=128))
        await engine.start()
        try:
            return "".join([d.text async for d in engine.generate(EngineRequest("r", ids, options))])
        finally:
            await engine.shutdown()

    llama, processor, tokens = load_llama(path, n_ctx=128), RepetitionPenaltyLogitsProcessor(1.8), list(ids)
    try:
        eval_prompt(llama, tokens)
        for _ in range(12):
            scores = processor(torch.tensor([tokens]), torch.from_numpy(last_logits(llama).copy())[None])
            tokens.append(int(scores.argmax()))
            llama.eval([tokens[-1]])
    finally:
        llama.close()
    expected = tokenizer.decode(tokens[len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert asyncio.run(served()) == expected


def test_llamacpp_greedy_honours_logit_bias(gguf_variants: dict[str, Path]) -> None:
    """The greedy fast path (argmax of llama.cpp's logits) steps aside for a logit bias: +100 repeats a
    token, -100 bans the one greedy decoding picked first."""
    import asyncio

    from transformers import AutoTokenizer

    from steerserve.precision import Precision
    from steerserve.server.engines.base import EngineConfig, EngineRequest, LogitBias, SamplingOptions
    from steerserve.server.engines.llamacpp_engine import LlamaCppEngine

    path = gguf_variants["gguf-q8_0"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.encode(PROMPTS[1])
    forced = tokenizer.convert_tokens_to_ids("a")

    async def served(bias: dict[int, float] | None) -> list[int]:
        options = SamplingOptions(max_tokens=6, temperature=0.0, ignore_eos=True,
                                  logit_bias=LogitBias.of(bias) if bias else None)
        engine = LlamaCppEngine(EngineConfig(model=str(path), precision=Precision.GGUF_Q8_0, max_model_len=128))
        await engine.start()
        try:
            text = "".join([d.text async for d in engine.generate(EngineRequest("r", ids, options))])
        finally:
            await engine.shutdown()
        return tokenizer.encode(text, add_special_tokens=False)

    assert asyncio.run(served({forced: 100.0})) == [forced] * 6
    first = asyncio.run(served(None))[0]
    assert first not in asyncio.run(served({first: -100.0}))
