"""The shared penalties of the transformers and llama.cpp engines against vLLM's and transformers' own."""

from __future__ import annotations

import pytest
import torch

from steerserve.server.engines.base import SamplingOptions
from steerserve.server.engines.sampling import apply_penalties

VOCAB = 50


def _case(seed: int) -> tuple[torch.Tensor, list[int], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=generator) * 3
    prompt = torch.randint(0, VOCAB, (12,), generator=generator).tolist()
    output = torch.randint(0, VOCAB, (20,), generator=generator).tolist()  # repeats some ids
    return logits, prompt, output


@pytest.mark.parametrize(("presence", "frequency", "repetition"),
                         [(0.0, 0.0, 1.3), (0.5, 0.0, 1.0), (0.0, 0.7, 1.0), (-0.4, 1.2, 0.8), (2.0, -2.0, 2.5)])
def test_penalties_equal_vllms(presence: float, frequency: float, repetition: float) -> None:
    """Same order and definitions as vLLM's sampler: repetition over prompt + output, then OpenAI's two."""
    vllm_utils = pytest.importorskip("vllm.model_executor.layers.utils")
    options = SamplingOptions(max_tokens=1, presence_penalty=presence, frequency_penalty=frequency,
                              repetition_penalty=repetition)
    for seed in range(4):
        logits, prompt, output = _case(seed)
        expected = vllm_utils.apply_penalties(
            logits.clone()[None], torch.tensor([prompt]), torch.tensor([output]), torch.tensor([presence]),
            torch.tensor([frequency]), torch.tensor([repetition]))[0]
        ours = logits.clone()
        apply_penalties(ours, prompt, output, options)
        torch.testing.assert_close(ours, expected)


def test_repetition_penalty_equals_transformers_processor() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    options = SamplingOptions(max_tokens=1, repetition_penalty=1.7)
    logits, prompt, output = _case(7)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone()[None])[0]
    ours = logits.clone()
    apply_penalties(ours, prompt, output, options)
    torch.testing.assert_close(ours, expected)


def test_no_output_yet_and_ids_past_the_logits_are_harmless() -> None:
    """The first token has no output to count; a tokenizer id beyond the logits' width is skipped."""
    logits, prompt, _ = _case(3)
    ours = logits.clone()
    apply_penalties(ours, prompt + [VOCAB + 5], [], SamplingOptions(max_tokens=1, frequency_penalty=2.0,
                                                                   presence_penalty=2.0))
    torch.testing.assert_close(ours, logits)
    assert not SamplingOptions(max_tokens=1).penalized and SamplingOptions(max_tokens=1, presence_penalty=0.1).penalized


def test_logit_bias_is_added_before_the_penalties_as_in_vllm() -> None:
    """vLLM applies logit bias among its argmax-changing processors, then the penalties; so do we."""
    from steerserve.server.engines.base import LogitBias
    from steerserve.server.engines.sampling import adjust_logits

    logits, prompt, output = _case(11)
    bias = LogitBias.of({3: 5.0, 7: -2.5, VOCAB + 2: 9.0})  # an id past the logits' width is skipped
    options = SamplingOptions(max_tokens=1, repetition_penalty=1.5, frequency_penalty=0.3, logit_bias=bias)
    expected = logits.clone()
    expected[3] += 5.0
    expected[7] -= 2.5
    apply_penalties(expected, prompt, output, options)
    ours = logits.clone()
    adjust_logits(ours, prompt, output, options)
    torch.testing.assert_close(ours, expected)
    assert SamplingOptions(max_tokens=1, logit_bias=bias).adjusts_logits
    assert not SamplingOptions(max_tokens=1, logit_bias=LogitBias.of({})).adjusts_logits


def test_a_callers_bias_adds_to_the_sliders() -> None:
    from steerserve.server.engines.base import LogitBias

    slider = LogitBias.of({1: -2.0, 2: 1.0})
    merged = slider.merged(LogitBias.of({2: 0.5, 9: -100.0}))
    assert merged.as_dict == {1: -2.0, 2: 1.5, 9: -100.0}
    assert slider.merged(None) is slider
