"""VLLMEngine on the tiny random Llama: one in-process vLLM engine for the whole module (~25 s start)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_asyncio

from steerserve.precision import Precision
from steerserve.server.engines.base import (
    ContextLengthExceeded,
    EngineConfig,
    EngineNotReady,
    EndPush,
    EngineRequest,
    GenerationDelta,
    LogitBias,
    SamplingOptions,
)

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from steerserve.server.engines.vllm_args import detect_platform  # noqa: E402
from steerserve.server.engines.vllm_engine import VLLMEngine, _sampling_params, checkpoint_weight_bytes  # noqa: E402
from steerserve.server.engines.vllm_loop_guard import (  # noqa: E402
    LOOP_GUARD_ARG,
    LoopGuardLogitsProcessor,
    loop_repeats_of,
)
from steerserve.server.engines.vllm_reading_level import READING_LEVEL_ARG  # noqa: E402
from steerserve.server.engines.vllm_verbosity import VERBOSITY_ARG  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

PROMPT = "Question: What is the capital of France? Answer:"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model_dir: Path):
    eng = VLLMEngine(EngineConfig(model=str(tiny_model_dir), precision=Precision.BF16, max_model_len=512,
                                  kv_cache_gib=1, reading_level_guidance=2.0))
    eng.steps = []  # batch sizes reported through on_step
    eng.on_step = eng.steps.append
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).encode(PROMPT, add_special_tokens=False)


def request(ids: list[int], rid: str, **options) -> EngineRequest:
    return EngineRequest(rid, ids, SamplingOptions(**options))


async def collect(engine: VLLMEngine, req: EngineRequest) -> list[GenerationDelta]:
    return [delta async for delta in engine.generate(req)]


def text_of(deltas: list[GenerationDelta], index: int = 0) -> str:
    return "".join(d.text for d in deltas if d.index == index)


async def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_not_ready_before_start(tiny_model_dir: Path) -> None:
    idle = VLLMEngine(EngineConfig(model=str(tiny_model_dir)))
    with pytest.raises(EngineNotReady):
        await collect(idle, request([1, 2], "x", max_tokens=2))
    with pytest.raises(EngineNotReady):
        await idle.next_token_logprobs([1, 2], [3])
    with pytest.raises(EngineNotReady):
        idle.weight_bytes()
    await idle.shutdown()  # a no-op before start


async def test_checkpoint_weight_bytes_follows_dtype(tiny_model_dir: Path) -> None:
    bf16 = checkpoint_weight_bytes(tiny_model_dir, "bfloat16")
    assert bf16 > 0
    assert checkpoint_weight_bytes(tiny_model_dir, "float32") == 2 * bf16


async def test_engine_args_come_from_config(tiny_model_dir: Path) -> None:
    config = EngineConfig(
        model=str(tiny_model_dir), precision=Precision.FP16, max_num_seqs=3, kv_cache_gib=2, extra={"seed": 9}
    )
    kwargs = VLLMEngine(config).engine_kwargs()
    computes_in = "float16" if detect_platform().cpu_native_bf16 or not detect_platform().is_cpu else "float32"
    assert kwargs["dtype"] == computes_in and kwargs["max_num_seqs"] == 3 and kwargs["seed"] == 9
    assert kwargs["logprobs_mode"] == "raw_logprobs"
    assert kwargs.get("kv_cache_memory_bytes", 2 << 30) == 2 << 30  # set on CPU only


async def test_greedy_stream_ends_at_max_tokens(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    deltas = await collect(engine, request(prompt_ids, "greedy", max_tokens=12, temperature=0.0, ignore_eos=True))
    assert text_of(deltas)
    assert sum(d.token_count for d in deltas) == 12
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert deltas[0].queued_s is not None and 0 <= deltas[0].queued_s < 5
    assert all(d.queued_s is None for d in deltas[1:])


async def test_penalties_reach_vllm(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    """The tiny model's greedy output repeats one token; a frequency penalty must break the repetition."""
    plain = text_of(await collect(engine, request(prompt_ids, "plain", max_tokens=12, temperature=0.0,
                                                  ignore_eos=True)))
    penalised = text_of(await collect(engine, request(prompt_ids, "freq", max_tokens=12, temperature=0.0,
                                                      ignore_eos=True, frequency_penalty=2.0)))
    assert plain != penalised


async def test_seed_makes_sampling_repeatable(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    def sampled(rid: str, seed: int) -> EngineRequest:
        return request(prompt_ids, rid, max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)

    first, again, other = [text_of(await collect(engine, sampled(f"seed{i}", s))) for i, s in enumerate((7, 7, 8))]
    assert first == again
    assert first != other  # near-uniform random model: 16 tokens cannot coincide by chance


async def test_n_choices_stream_by_index(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    deltas = await collect(engine, request(prompt_ids, "n2", max_tokens=6, n=2, seed=3, ignore_eos=True))
    assert {d.index for d in deltas} == {0, 1}
    for index in (0, 1):
        mine = [d for d in deltas if d.index == index]
        assert mine[-1].finish_reason == "length" and sum(d.token_count for d in mine) == 6
        assert mine[0].queued_s is not None


async def test_greedy_n_choices_are_identical(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    # vLLM itself refuses n > 1 with temperature 0; the engine decodes once and copies.
    deltas = await collect(engine, request(prompt_ids, "greedy-n", max_tokens=5, n=3, temperature=0.0))
    assert {d.index for d in deltas} == {0, 1, 2}
    assert text_of(deltas, 0) == text_of(deltas, 1) == text_of(deltas, 2) != ""


def _reading_level_biases(tiny_model_dir: Path, level: int = 0, strength: float = 2.0) -> tuple[LogitBias, LogitBias]:
    """The slider's bias at ``level`` as the server makes it (tagged with its level), and the same as a bare map."""
    from transformers import AutoTokenizer

    from steerserve.reading_level import guide_for

    bias = guide_for(AutoTokenizer.from_pretrained(tiny_model_dir)).logit_bias(level, strength)
    return LogitBias.of(bias, (level, strength)), LogitBias.of(bias)


async def test_reading_level_guidance_runs_inside_vllm(engine: VLLMEngine, prompt_ids: list[int],
                                                       tiny_model_dir: Path) -> None:
    """The slider's bias sent as (level, strength) to the engine's own processor decodes exactly as the same
    bias sent as a logit_bias map, alone, beside unguided requests in one batch, and under a caller's bias."""
    assert engine._guides_reading_level  # reading_level_guidance > 0: the processor is installed
    guided, as_map = _reading_level_biases(tiny_model_dir)
    args = dict(max_tokens=16, temperature=0.0, ignore_eos=True)

    async def text(rid: str, **options) -> str:
        return text_of(await collect(engine, request(prompt_ids, rid, **args, **options)))

    inside, mapped, plain = await text("rl-in", guidance=guided), await text("rl-map", logit_bias=as_map), \
        await text("rl-plain")
    assert inside == mapped != plain
    batch = await asyncio.gather(*(text(f"rl-mix{i}", **({"guidance": guided} if i % 2 else {})) for i in range(6)))
    assert batch == [plain, inside] * 3
    forced = LogitBias.of({prompt_ids[-1]: 100.0})
    on_top = await text("rl-forced", guidance=guided, logit_bias=forced)
    assert on_top == await text("rl-forced-map", logit_bias=as_map.merged(forced))


async def test_verbosity_push_runs_inside_vllm(engine: VLLMEngine, prompt_ids: list[int], tiny_model_dir: Path) -> None:
    """The verbosity push reaches vLLM's processor as (level, strength) and acts on each request's own output: with
    "." forced by 100 logits and the end token held 5 below it, a push of 10 ends the answer after the first full
    stop; unpushed requests beside it in the batch run on to max_tokens."""
    from transformers import AutoTokenizer

    from steerserve.verbosity_guidance import end_guide_for

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    guide = end_guide_for(tokenizer)
    stop, eos = tokenizer.convert_tokens_to_ids("."), tokenizer.eos_token_id
    args = dict(max_tokens=8, temperature=0.0, logit_bias=LogitBias.of({stop: 100.0, eos: 95.0}))
    pushed = dict(end_push=EndPush(guide, 0, 10.0))
    assert _sampling_params(SamplingOptions(**args, **pushed), n=1).extra_args == {VERBOSITY_ARG: [0, 10.0]}

    async def answer(rid: str, **options) -> tuple[str, str | None]:
        deltas = await collect(engine, request(prompt_ids, rid, **args, **options))
        return text_of(deltas), deltas[-1].finish_reason

    batch = await asyncio.gather(*(answer(f"vp{i}", **(pushed if i % 2 else {})) for i in range(6)))
    assert batch == [("." * 8, "length"), (".", "stop")] * 3


async def test_loop_guard_runs_inside_vllm(engine: VLLMEngine, prompt_ids: list[int], tiny_model_dir: Path) -> None:
    """A request asking for the loop guard reaches vLLM's processor with its copies and ends on its own output: with
    "." forced by 100 logits the answer is a one-token loop, ended at the 32nd "." (the shortest loop the guard
    sees); unguarded requests beside it in the batch, and a guarded one that ignores the end token, run on."""
    from transformers import AutoTokenizer

    from steerserve.loop_guard import MIN_LOOP_TOKENS

    stop = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids(".")
    args = dict(max_tokens=40, temperature=0.0, logit_bias=LogitBias.of({stop: 100.0}))
    assert _sampling_params(SamplingOptions(**args, loop_repeats=4), n=1).extra_args == {LOOP_GUARD_ARG: 4}
    ignoring = _sampling_params(SamplingOptions(**args, loop_repeats=4, ignore_eos=True), n=1)
    assert ignoring.extra_args == {LOOP_GUARD_ARG: 4} and loop_repeats_of(ignoring) == 0

    async def answer(rid: str, **options) -> tuple[str, str | None]:
        deltas = await collect(engine, request(prompt_ids, rid, **args, **options))
        return text_of(deltas), deltas[-1].finish_reason

    asks = [{}, {"loop_repeats": 4}, {"loop_repeats": 4, "ignore_eos": True}] * 2
    batch = await asyncio.gather(*(answer(f"lg{i}", **ask) for i, ask in enumerate(asks)))
    assert batch == [("." * 40, "length"), ("." * MIN_LOOP_TOKENS, "stop"), ("." * 40, "length")] * 2
    params = SamplingParams(max_tokens=4, extra_args={LOOP_GUARD_ARG: 1})
    with pytest.raises(ValueError, match=">= 2"):
        LoopGuardLogitsProcessor.validate_params(params)


async def test_guidance_travels_as_level_and_strength_only_where_the_processor_runs(tiny_model_dir: Path) -> None:
    guided, _ = _reading_level_biases(tiny_model_dir, level=1, strength=3.0)
    caller = LogitBias.of({5: -4.0})
    options = SamplingOptions(max_tokens=4, guidance=guided, logit_bias=caller)
    inside = _sampling_params(options, n=1, guided=True)
    assert inside.extra_args == {READING_LEVEL_ARG: [1, 3.0]} and inside.logit_bias == {5: -4.0}
    outside = _sampling_params(options, n=1, guided=False)
    assert not outside.extra_args and outside.logit_bias == options.total_logit_bias.as_dict
    assert outside.logit_bias[5] == guided.as_dict.get(5, 0.0) - 4.0


async def test_stop_string_cuts_the_text(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    # Seeded sampling, not greedy: a random model's greedy text repeats one token.
    sampled = dict(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    full = text_of(await collect(engine, request(prompt_ids, "full", **sampled)))
    stop = next(full[i : i + 2] for i in range(len(full) // 2, len(full) - 1) if full.find(full[i : i + 2]) > 0)
    deltas = await collect(engine, request(prompt_ids, "stopped", stop=(stop,), **sampled))
    assert text_of(deltas) == full[: full.find(stop)]
    assert deltas[-1].finish_reason == "stop"


async def test_concurrent_requests_are_batched(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    engine.steps.clear()
    reqs = [request(prompt_ids + [i], f"batch{i}", max_tokens=16, ignore_eos=True, seed=i) for i in range(6)]
    results = await asyncio.gather(*(collect(engine, r) for r in reqs))
    for deltas in results:
        assert sum(d.token_count for d in deltas) == 16 and deltas[-1].finish_reason == "length"
    assert max(engine.steps) > 1
    assert engine.running == 0


async def only_one_runs_now(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    """A new request decodes alone: nothing left over from an earlier abort holds a batch slot."""
    engine.steps.clear()
    await collect(engine, request(prompt_ids, f"probe{time.monotonic()}", max_tokens=4, ignore_eos=True))
    assert engine.steps and set(engine.steps) == {1}


async def test_closing_the_stream_aborts_the_request(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    stream = engine.generate(request(prompt_ids, "closed", max_tokens=400, ignore_eos=True))
    assert (await anext(stream)).token_count > 0
    await stream.aclose()
    await wait_until(lambda: engine.running == 0)
    await only_one_runs_now(engine, prompt_ids)


async def test_cancelling_the_consumer_aborts_the_request(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request(prompt_ids, "cancelled", max_tokens=400, ignore_eos=True)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: engine.running == 0)
    await only_one_runs_now(engine, prompt_ids)


async def test_abort_ends_the_stream_with_abort(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    stream = engine.generate(request(prompt_ids, "aborted", max_tokens=400, ignore_eos=True))
    deltas = [await anext(stream)]
    await engine.abort("aborted")
    deltas += [d async for d in stream]
    assert deltas[-1].finish_reason == "abort"
    assert sum(d.token_count for d in deltas) < 400


async def test_too_long_prompt_is_rejected(engine: VLLMEngine) -> None:
    with pytest.raises(ContextLengthExceeded):
        await collect(engine, request([5] * 512, "long", max_tokens=4))
    with pytest.raises(ContextLengthExceeded):
        await engine.next_token_logprobs([5] * 600, [6])
    # The backstop for vLLM's own check (the length check above normally comes first).
    from vllm.exceptions import VLLMValidationError

    error = VLLMValidationError("This model's maximum context length is 512 tokens. However, ...")
    assert isinstance(engine._map_validation_error(error, 600, 4), ContextLengthExceeded)


async def test_next_token_logprobs_match_transformers(
    engine: VLLMEngine, prompt_ids: list[int], tiny_model_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    candidates = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(f" {c}"))[0] for c in "ABCD"]
    candidates += [candidates[0], 7]  # repeats and any other id are fine
    got = await engine.next_token_logprobs(prompt_ids, candidates)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1].float()
    want = torch.log_softmax(logits, dim=-1)[candidates].tolist()
    assert got == pytest.approx(want, abs=0.05)
    assert got[0] == got[4]


async def test_weight_bytes_match_the_checkpoint(engine: VLLMEngine, tiny_model_dir: Path) -> None:
    size = (tiny_model_dir / "model.safetensors").stat().st_size  # bf16 on disk
    if engine.engine_kwargs()["dtype"] == "float32":  # a CPU without native bf16 upcasts as it loads
        size *= 2
    assert 0.9 * size < engine.weight_bytes() <= size


async def test_shutdown_is_idempotent_and_final(engine: VLLMEngine, prompt_ids: list[int]) -> None:
    await engine.shutdown()
    await engine.shutdown()
    with pytest.raises(EngineNotReady):
        await collect(engine, request(prompt_ids, "late", max_tokens=2))
    with pytest.raises(EngineNotReady):
        await engine.next_token_logprobs(prompt_ids, [3])
