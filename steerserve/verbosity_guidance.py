"""Verbosity guidance: the verbosity slider as a push towards ending the answer, while decoding.

Attribute-conditioned SFT teaches the 135M default model most of the verbosity slider, but not all of it: its
answers at levels 3 and 4 come out the same length (level 4 even a little shorter on some machines), and the
level 4 / level 0 ratio lands just under the ×3 target. A reply is short when the model ends it early, and the
model decides that one token at a time: where it is ready to stop (a finished sentence, list or paragraph) the
end-of-turn token is among its likely next tokens. This module raises that token's logit below the top level,
by ``strength * (4 - verbosity) / 4``::

    verbosity_bias(end_ids=(2,), verbosity=0, strength=6.0)   # {2: 6.0}: end at the first good place
    verbosity_bias(end_ids=(2,), verbosity=4, strength=6.0)   # {}: the model's own length, untouched

The push is a few logits: mid-sentence the end token sits far below the words that would continue, so it still
ends the answer only where the model itself saw an end coming, and how early depends on the prompt as the
HelpSteer definition of verbosity asks (length relative to what the prompt calls for), not on a token budget.
Level 4 (the SteerLM default) adds nothing, so default-slider answers are exactly the model's; a pushed answer
has at least one token (the server asks ``min_tokens`` 1), so the push never returns an empty one. Like
:mod:`steerserve.reading_level` the bias is a plain OpenAI ``logit_bias`` map (one or two entries), which every
engine applies the same way.
"""

from __future__ import annotations

from typing import Any

from steerserve.attributes import MAX_LEVEL

DEFAULT_VERBOSITY_STRENGTH = 6.0
"""Logits the end-of-turn token is pushed up by at verbosity 0 (a quarter of it at level 3). A probe on the
steered default (16 MT-Bench prompts, greedy, 640 tokens, vLLM bf16) gave mean characters at verbosity 0 -> 4 of
322 -> 540 -> 1053 -> 1154 -> 1277 at strength 6, 272 -> 395 -> 809 -> 950 -> 1277 at 8 (one answer there ended
before its first word) and 336 -> 771 -> 944 -> 1241 -> 1495 at 4; the 80-prompt sweep:
benchmarks/results/verbosity-guidance/."""


def end_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The tokens that end an answer: the tokenizer's end-of-sequence token (a chat model's end-of-turn token,
    ``<|im_end|>`` for the default model), and the generation config's own where the tokenizer folder has one."""
    ids = {tokenizer.eos_token_id}
    path = getattr(tokenizer, "name_or_path", None)
    if path:
        try:
            from transformers import GenerationConfig

            config_eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
        except (OSError, ValueError):  # no generation_config.json beside the tokenizer
            config_eos = None
        ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return tuple(sorted(i for i in ids if i is not None and i >= 0))


def verbosity_bias(end_ids: tuple[int, ...], verbosity: int, strength: float = DEFAULT_VERBOSITY_STRENGTH
                   ) -> dict[int, float]:
    """The bias for a verbosity level: empty at the top level or at strength 0."""
    scale = strength * (MAX_LEVEL - verbosity) / MAX_LEVEL
    return {token: round(scale, 4) for token in end_ids} if scale > 0 else {}
