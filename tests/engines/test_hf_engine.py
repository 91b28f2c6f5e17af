"""TransformersEngine on tiny random Llamas: exactness against ``generate``, batching, sampling, lifecycle.

The fixture tiny model's greedy output just repeats its last token, so the exactness
tests use a copy with larger random weights (varied output) and one whose EOS row
mirrors a token greedy decoding picks (so EOS is reliably generated).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steerserve.precision import Precision
from steerserve.server.engines import load_engine_class
from steerserve.server.engines.base import (
    ContextLengthExceeded, EngineConfig, EngineError, EngineNotReady, EngineRequest, GenerationDelta, SamplingOptions,
)
from steerserve.server.engines.hf_engine import TransformersEngine, load_kwargs
from steerserve.server.engines.hf_scheduler import TextTracker

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPTS = [  # 1 to ~30 tokens
    "Hello", "Question: What is the capital", "The quick brown fox jumps over the lazy dog. A chat between",
    "quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4 User Assistant System",
]
EOS_PROMPT = "The quick brown fox"


def _save_variant(src: Path, dst: Path, edit: Callable[[torch.nn.Module], None]) -> Path:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        edit(model)
    model.to(torch.bfloat16).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _randomize(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for weight in model.parameters():
        if weight.ndim == 2:  # std 0.3 instead of 0.02: greedy output varies instead of repeating
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def varied_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_variant(tiny_model_dir, tmp_path_factory.mktemp("varied"), _randomize)


@pytest.fixture(scope="module")
def tokenizer(varied_dir: Path):
    return AutoTokenizer.from_pretrained(varied_dir)


# The dtype the engine computes the bf16 checkpoint in here (float32 on a CPU that only emulates bf16).
ENGINE_DTYPE = getattr(torch, load_kwargs(EngineConfig(model="checkpoint"))["dtype"])


@pytest.fixture(scope="module")
def reference(varied_dir: Path):
    """The same checkpoint loaded the default way (sdpa attention), for ``generate`` and forwards."""
    return AutoModelForCausalLM.from_pretrained(varied_dir, dtype=ENGINE_DTYPE).eval()


@pytest.fixture(scope="module")
def eos_dir(varied_dir: Path, reference, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EOS's (tied) embedding = 2x that of greedy's 4th token: EOS wins by then at the latest."""
    ids = torch.tensor([tokenizer.encode(EOS_PROMPT)])
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    target = int(out[0, -1])

    def edit(model: torch.nn.Module) -> None:
        embeddings = model.get_input_embeddings().weight
        embeddings[tokenizer.eos_token_id] = 2 * embeddings[target]

    return _save_variant(varied_dir, tmp_path_factory.mktemp("eos"), edit)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(varied_dir: Path):
    eng = TransformersEngine(EngineConfig(model=str(varied_dir), precision=Precision.BF16, max_model_len=256))
    eng.steps = []  # batch sizes reported through on_step
    eng.on_step = eng.steps.append
    await eng.start()
    yield eng
    await eng.shutdown()


def request(ids: list[int], rid: str = "r", **options) -> EngineRequest:
    return EngineRequest(rid, ids, SamplingOptions(**options))


async def collect(engine: TransformersEngine, req: EngineRequest) -> list[GenerationDelta]:
    return [delta async for delta in engine.generate(req)]


def summary(deltas: list[GenerationDelta], index: int = 0) -> tuple[str, int, str | None]:
    """(text, token count, finish reason) of one choice."""
    mine = [d for d in deltas if d.index == index]
    return "".join(d.text for d in mine), sum(d.token_count for d in mine), mine[-1].finish_reason


def generate_reference(model, tokenizer, ids: list[int], max_tokens: int, **options) -> tuple[str, int, str]:
    """(text, token count, finish reason) of greedy ``generate`` (``options``: e.g. its repetition_penalty)."""
    inputs = torch.tensor([ids])
    out = model.generate(
        inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **options,
    )[0, len(ids) :].tolist()
    hit_eos = out[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text, len(out), "stop" if hit_eos else "length"


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_registry_names_this_engine() -> None:
    assert load_engine_class("transformers") is TransformersEngine


async def test_greedy_matches_generate(engine, reference, tokenizer) -> None:
    ids = tokenizer.encode(PROMPTS[1])
    deltas = await collect(engine, request(ids, max_tokens=24, temperature=0))
    assert summary(deltas) == generate_reference(reference, tokenizer, ids, 24)
    assert deltas[0].queued_s is not None and deltas[0].queued_s >= 0
    assert all(d.queued_s is None for d in deltas[1:])


async def test_penalised_greedy_matches_generate(engine, reference, tokenizer) -> None:
    """repetition_penalty as transformers' generate applies it; beside an unpenalised row in one batch.

    On the first prompt whose greedy answer the penalty changes: which prompts it changes depends on the dtype
    the engine computes in on this CPU, and one it leaves alone would not show the penalty applied."""
    references = [(ids, generate_reference(reference, tokenizer, ids, 24),
                   generate_reference(reference, tokenizer, ids, 24, repetition_penalty=1.8))
                  for ids in map(tokenizer.encode, PROMPTS)]
    ids, expected_plain, expected_penalised = next(r for r in references if r[1] != r[2])
    penalised, plain = await asyncio.gather(
        collect(engine, request(ids, "pen", max_tokens=24, temperature=0, repetition_penalty=1.8)),
        collect(engine, request(ids, "plain", max_tokens=24, temperature=0)))
    assert summary(penalised) == expected_penalised
    assert summary(plain) == expected_plain


async def test_batched_equals_alone(engine, reference, tokenizer) -> None:
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 4
    alone = [summary(await collect(engine, request(p, max_tokens=20, temperature=0))) for p in prompts]
    assert alone[2] == generate_reference(reference, tokenizer, prompts[2], 20)
    engine.steps.clear()
    batched = await asyncio.gather(*(collect(engine, request(p, f"b{i}", max_tokens=20, temperature=0))
                                     for i, p in enumerate(prompts)))
    assert [summary(d) for d in batched] == alone
    assert max(engine.steps) == 4  # decoded together


@pytest.mark.parametrize("first", [0, 3], ids=["shortest-first", "longest-first"])
async def test_joining_a_running_batch_keeps_outputs(engine, tokenizer, first: int) -> None:
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    alone = [summary(await collect(engine, request(p, max_tokens=16, temperature=0))) for p in prompts]
    running = engine.generate(request(prompts[first], "first", max_tokens=16, temperature=0))
    head = [await anext(running), await anext(running)]  # already decoding when the others arrive
    others = [i for i in range(4) if i != first]
    late = asyncio.gather(*(collect(engine, request(prompts[i], f"l{i}", max_tokens=16, temperature=0))
                            for i in others))
    rest = [d async for d in running]
    assert summary(head + rest) == alone[first]
    assert [summary(d) for d in await late] == [alone[i] for i in others]


async def test_seeded_sampling_is_reproducible_in_any_batch(engine, tokenizer) -> None:
    ids = tokenizer.encode(PROMPTS[0])
    seeded = request(ids, "s", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    alone = summary(await collect(engine, seeded))
    others = [collect(engine, request(tokenizer.encode(p), f"o{i}", max_tokens=16, temperature=1.0))
              for i, p in enumerate(PROMPTS[1:])]
    results = await asyncio.gather(collect(engine, seeded), *others)
    assert summary(results[0]) == alone
    other_seed = summary(await collect(engine, request(ids, "s2", max_tokens=16, temperature=1.0, seed=99)))
    assert other_seed[0] != alone[0]


async def test_n_choices(engine, tokenizer) -> None:
    ids = tokenizer.encode(PROMPTS[1])
    greedy = summary(await collect(engine, request(ids, max_tokens=8, temperature=0)))
    deltas = await collect(engine, request(ids, max_tokens=8, temperature=0, n=2))
    assert summary(deltas, 0) == summary(deltas, 1) == greedy
    sampled = await collect(engine, request(ids, max_tokens=8, temperature=1.0, seed=7, n=2))
    assert {d.index for d in sampled} == {0, 1}
    assert summary(sampled, 0)[1:] == summary(sampled, 1)[1:] == (8, "length")
    assert summary(sampled, 0)[0] != summary(sampled, 1)[0]


async def test_stop_string_cuts_text(engine, tokenizer) -> None:
    ids = tokenizer.encode(PROMPTS[2])
    full, _, _ = summary(await collect(engine, request(ids, max_tokens=24, temperature=0)))
    stop = full[10:13]
    deltas = await collect(engine, request(ids, max_tokens=24, temperature=0, stop=("never-there", stop)))
    text, tokens, reason = summary(deltas)
    assert (text, reason) == (full[: full.index(stop)], "stop")
    assert tokens < 24


async def test_max_tokens_finishes_with_length(engine, tokenizer) -> None:
    deltas = await collect(engine, request(tokenizer.encode(PROMPTS[0]), max_tokens=5, temperature=0.7))
    assert summary(deltas)[1:] == (5, "length")
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)


async def test_max_model_len_finishes_with_length(engine, tokenizer) -> None:
    ids = tokenizer.encode(PROMPTS[0]) * 250  # 250 tokens of a 256-token context
    assert summary(await collect(engine, request(ids, max_tokens=50, temperature=0)))[1:] == (6, "length")
    with pytest.raises(ContextLengthExceeded):
        engine.generate(request(ids * 2, max_tokens=1))


async def test_eos_stops_unless_ignored(eos_dir: Path, tokenizer) -> None:
    eos_model = AutoModelForCausalLM.from_pretrained(eos_dir, dtype=ENGINE_DTYPE).eval()
    eng = TransformersEngine(EngineConfig(model=str(eos_dir)))
    await eng.start()
    try:
        ids = tokenizer.encode(EOS_PROMPT)
        stopped = summary(await collect(eng, request(ids, max_tokens=30, temperature=0)))
        assert stopped == generate_reference(eos_model, tokenizer, ids, 30)
        assert stopped[2] == "stop" and stopped[1] <= 4
        ignored = summary(await collect(eng, request(ids, max_tokens=30, temperature=0, ignore_eos=True)))
        assert ignored[1:] == (30, "length")
    finally:
        await eng.shutdown()


async def test_closing_the_stream_frees_the_slot(engine, tokenizer) -> None:
    stream = engine.generate(request(tokenizer.encode(PROMPTS[0]), max_tokens=200, temperature=0))
    await anext(stream)
    assert engine.running == 1
    await stream.aclose()
    await wait_until(lambda: engine.running == 0)


async def test_cancelled_consumer_frees_the_slot(engine, tokenizer) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request(tokenizer.encode(PROMPTS[1]), max_tokens=200, temperature=0)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_until(lambda: engine.running == 0 and engine.waiting == 0)


async def test_abort_ends_every_stream_with_that_id(engine, tokenizer) -> None:
    streams = [engine.generate(request(tokenizer.encode(p), "victim", max_tokens=200, temperature=0, n=2))
               for p in PROMPTS[:2]]
    firsts = [await anext(stream) for stream in streams]
    await engine.abort("victim")
    for first, stream in zip(firsts, streams):
        rest = [d async for d in stream]
        assert {d.index for d in rest if d.finish_reason == "abort"} == {0, 1}
        assert sum(d.token_count for d in [first, *rest]) < 400
    await wait_until(lambda: engine.running == 0)


async def test_next_token_logprobs_match_a_forward_pass(engine, reference, tokenizer) -> None:
    ids = tokenizer.encode(PROMPTS[1])
    candidates = [tokenizer.encode(f" {c}")[0] for c in "ABCD"]
    busy = asyncio.ensure_future(collect(engine, request(ids, "busy", max_tokens=30, temperature=0)))
    got = await engine.next_token_logprobs(ids, candidates)  # interleaves with the decode loop
    with torch.inference_mode():
        logits = reference(torch.tensor([ids])).logits[0, -1].float()
    # float32 (no native bf16 here) sums in another order beside a running batch: equal to ~1e-6
    assert got == pytest.approx(logits.log_softmax(-1)[candidates].tolist(), abs=1e-5)
    assert summary(await busy)[1] == 30


async def test_weight_bytes_counts_parameters_and_buffers(engine, reference) -> None:
    tensors = [*reference.parameters(), *reference.buffers()]
    assert engine.weight_bytes() == sum(t.numel() * t.element_size() for t in tensors)


async def test_step_failure_reaches_every_stream(varied_dir: Path, tokenizer) -> None:
    eng = TransformersEngine(EngineConfig(model=str(varied_dir)))
    await eng.start()
    try:
        ids = tokenizer.encode(PROMPTS[0])
        healthy_decode = eng._batch.decode
        eng._batch.decode = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        results = await asyncio.gather(*(collect(eng, request(ids, f"f{i}", max_tokens=5)) for i in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, EngineError) and "boom" in str(r) for r in results)
        eng._batch.decode = healthy_decode  # the engine keeps serving after a failed step
        assert summary(await collect(eng, request(ids, max_tokens=3)))[1:] == (3, "length")
    finally:
        await eng.shutdown()


async def test_not_ready_before_start_and_after_shutdown(varied_dir: Path, tokenizer) -> None:
    eng = TransformersEngine(EngineConfig(model=str(varied_dir)))
    with pytest.raises(EngineNotReady):
        eng.generate(request([1, 2], max_tokens=2))
    await eng.start()
    stream = eng.generate(request(tokenizer.encode(PROMPTS[0]), max_tokens=200, temperature=0))
    await anext(stream)
    await eng.shutdown()
    assert [d.finish_reason async for d in stream][-1] == "abort"
    await eng.shutdown()  # idempotent
    with pytest.raises(EngineNotReady):
        await collect(eng, request([1, 2], max_tokens=2))
    with pytest.raises(EngineNotReady):
        await eng.next_token_logprobs([1, 2], [3])
    with pytest.raises(EngineNotReady):
        eng.weight_bytes()
    assert eng.running == 0


async def test_masked_attention_path_batches_correctly(varied_dir: Path, tokenizer) -> None:
    """An explicit attention implementation keeps transformers' masks (no per-row attention)."""
    eng = TransformersEngine(EngineConfig(model=str(varied_dir), extra={"attn_implementation": "eager"}))
    await eng.start()
    try:
        assert not eng._batch.padded_attention and eng._batch.mergeable
        prompts = [tokenizer.encode(p) for p in PROMPTS]
        alone = [summary(await collect(eng, request(p, max_tokens=12, temperature=0))) for p in prompts]
        running = eng.generate(request(prompts[0], max_tokens=12, temperature=0))
        head = [await anext(running), await anext(running)]
        late = await asyncio.gather(*(collect(eng, request(p, max_tokens=12, temperature=0)) for p in prompts[1:]))
        assert [summary(head + [d async for d in running])] + [summary(d) for d in late] == alone
    finally:
        await eng.shutdown()


@pytest.fixture(scope="module")
def sliding_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral whose 6-token sliding window is shorter than the prompts."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=6, initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("sliding")
    MistralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


async def test_sliding_window_model_rebuilds_the_cache(sliding_dir: Path, tokenizer) -> None:
    """Caches that can't be spliced are re-prefilled when requests join; outputs still match ``generate``."""
    eng = TransformersEngine(EngineConfig(model=str(sliding_dir), precision=Precision.FP32))
    await eng.start()
    try:
        assert not eng._batch.mergeable
        prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
        running = eng.generate(request(prompts[0], max_tokens=12, temperature=0))
        head = [await anext(running), await anext(running)]
        late = await asyncio.gather(*(collect(eng, request(p, max_tokens=12, temperature=0)) for p in prompts[1:]))
        outputs = [summary(head + [d async for d in running])] + [summary(d) for d in late]
        model = AutoModelForCausalLM.from_pretrained(sliding_dir, dtype=torch.float32).eval()
        assert outputs == [generate_reference(model, tokenizer, p, 12) for p in prompts]
    finally:
        await eng.shutdown()


async def test_quantized_precisions(varied_dir: Path, reference, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
        with pytest.raises(EngineError, match="bitsandbytes"):
            await TransformersEngine(EngineConfig(model=str(varied_dir), precision=Precision.NF4)).start()
    with pytest.raises(EngineError, match="cannot serve"):
        await TransformersEngine(EngineConfig(model=str(varied_dir), precision=Precision.GPTQ_W4)).start()
    pytest.importorskip("bitsandbytes")
    eng = TransformersEngine(EngineConfig(model=str(varied_dir), precision=Precision.NF4))
    await eng.start()
    try:
        assert summary(await collect(eng, request([5, 6, 7], max_tokens=4)))[1:] == (4, "length")
        bf16_bytes = sum(t.numel() * t.element_size() for t in [*reference.parameters(), *reference.buffers()])
        assert 0 < eng.weight_bytes() < bf16_bytes
    finally:
        await eng.shutdown()


async def test_text_tracker_holds_back_partial_characters_and_stop_prefixes(tokenizer) -> None:
    text = "héllo wörld ✓ done"
    ids = tokenizer.encode(text)
    tracker, pieces = TextTracker(tokenizer, [], ()), []
    for i, token in enumerate(ids):
        tracker.add(token)
        pieces.append(tracker.take(final=i == len(ids) - 1)[0])
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)

    tracker, pieces = TextTracker(tokenizer, [], ("wör", "xyz")), []
    for token in ids:
        tracker.add(token)
        piece, stopped = tracker.take(final=False)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "héllo "
    assert all("w" not in p for p in pieces)  # "w" could start the stop string: held back, then cut
