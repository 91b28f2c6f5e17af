"""The loop guard: which tails count as a loop, how the samplers end one, how the server is told."""

from __future__ import annotations

import random

import pytest
import torch

from steerserve.loop_guard import MAX_PERIOD, MIN_LOOP_TOKENS, LoopWatch


def first_loop(ids: list[int], repeats: int = 4) -> int | None:
    """The length of the output at which a watch fed one token at a time first sees a loop."""
    watch = LoopWatch(repeats)
    return next((n for n in range(1, len(ids) + 1) if watch.feed(ids[:n])), None)


def test_a_verbatim_loop_is_seen_at_its_fourth_copy_once_the_run_is_long_enough() -> None:
    opening = list(range(100, 140))
    sentence = list(range(10, 20))  # "a sound that is both ..." as ten tokens
    assert first_loop(opening + sentence * 8) == 40 + 4 * 10  # four copies, 40 tokens
    assert first_loop(opening + sentence * 8, repeats=3) == 40 + 32  # three copies are 30 tokens: 32 needed
    word = [7, 8]  # "non-volatile," as two tokens: 16 copies make the 32-token run
    assert first_loop(opening + word * 40) == 40 + MIN_LOOP_TOKENS
    longest = list(range(200, 200 + MAX_PERIOD))
    assert first_loop(opening + longest * 5) == 40 + 4 * MAX_PERIOD
    assert first_loop(opening + list(range(300, 300 + MAX_PERIOD + 1)) * 5) is None  # longer stretches: not watched


@pytest.mark.parametrize("ids", [
    [5] * (MIN_LOOP_TOKENS - 1),  # "ha ha ha ...", a run of zeros: too short to be a loop
    [1, 2, 3] * 10,  # a table rule |---|---|---|
    list(range(1000)),
    [t for i in range(40) for t in (1, 2, 3, 100 + i)],  # near copies ("step 1", "step 2", ...) are no loop
])
def test_short_or_varied_repeats_are_left_alone(ids: list[int]) -> None:
    assert first_loop(ids) is None


def test_feeding_in_chunks_or_from_scratch_agrees() -> None:
    rng = random.Random(0)
    ids = [rng.randrange(50) for _ in range(60)] + [9, 8, 7, 6, 5] * 10
    step = LoopWatch()
    chunked = [step.feed(ids[:n]) for n in range(0, len(ids) + 1, 7)]
    assert chunked == [LoopWatch().feed(ids[:n]) for n in range(0, len(ids) + 1, 7)]
    assert LoopWatch().feed(ids) and not LoopWatch().feed(ids[:60])
    step.feed(ids[:10])  # a preempted request starts over from its first token
    assert not step.looping and step.seen == 10
    with pytest.raises(ValueError, match="at least 2 copies"):
        LoopWatch(1)


def test_the_samplers_make_the_end_token_the_only_choice_once_the_answer_loops() -> None:
    from steerserve.server.engines.base import SamplingOptions
    from steerserve.server.engines.sampling import adjust_logits

    assert SamplingOptions(max_tokens=100, loop_repeats=4).adjusts_logits
    looping, ends, inf = [3, 4] * 16, [0, 2], float("-inf")
    untouched, forced, masked = [1.0] * 10, [0.0 if i in ends else inf for i in range(10)], \
        [inf if i in ends else 1.0 for i in range(10)]
    for output, min_tokens, ignore_eos, expected in (
            (looping[:-1], 0, False, untouched),  # 31 tokens: one short of a loop
            (looping, 0, False, forced),
            (looping, 40, False, masked),  # min_tokens still holds the end back
            (looping, 0, True, untouched)):  # ignore_eos: nothing can end it
        logits = torch.ones(10)
        options = SamplingOptions(max_tokens=100, loop_repeats=4, min_tokens=min_tokens, ignore_eos=ignore_eos)
        adjust_logits(logits, [1], output, options, ends, LoopWatch(4))
        assert logits.tolist() == expected


@pytest.mark.parametrize("value", [1, -1, 65])
def test_one_copy_is_no_loop_in_the_settings(value: int) -> None:
    from pydantic import ValidationError

    from steerserve.server.settings import ServerSettings, VariantSpec

    with pytest.raises(ValidationError, match="loop_guard"):
        ServerSettings(loop_guard=value)
    with pytest.raises(ValidationError, match="loop_guard"):
        VariantSpec.parse(f"default,loop_guard={value}")
    assert ServerSettings(loop_guard=0).loop_guard == 0 and VariantSpec.parse("d,loop_guard=3").loop_guard == 3
