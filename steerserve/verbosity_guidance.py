"""Verbosity guidance: the verbosity slider as a push towards ending the answer at a sentence end, while decoding.

Attribute-conditioned SFT teaches the 135M default model most of the verbosity slider, but not all of it: its
answers at levels 3 and 4 come out the same length (level 4 even a little shorter on some machines), and the
level 4 / level 0 ratio lands under the ×3 target. A reply is short when the model ends it early, and the model
decides that one token at a time: where it is ready to stop, the end-of-turn token is among its likely next tokens.
This module raises that token's logit below the top level, by ``strength * (4 - verbosity) / 4``, and only right
after a finished sentence (the last token that is not white space ends in ``.``, ``!`` or ``?``, closing quotes
or brackets allowed)::

    guide = end_guide_for(tokenizer)
    push(verbosity=0, strength=6.0)                   # 6.0 logits on the end-of-turn token(s)
    push(verbosity=4, strength=6.0)                   # 0.0: the model's own length, untouched
    guide.at_sentence_end(output_ids)                 # whether this step may be pushed

An ungated push of the same size ended a quarter of the level-0 answers mid-sentence or on a colon ("consider the
following:"), where the model's own end-token logit was merely the least unlikely; after a full stop the push only
moves forward an end the model itself saw coming, so how early depends on the prompt, as the HelpSteer definition
of verbosity asks (length relative to what the prompt calls for), not on a token budget. Level 4 (the SteerLM
default) adds nothing, so default-slider answers are exactly the model's. The transformers and llama.cpp engines
apply it in :func:`steerserve.server.engines.sampling.adjust_logits`; vLLM in its own logits processor
(:mod:`steerserve.server.engines.vllm_verbosity`), which reads each request's live output tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steerserve.attributes import MAX_LEVEL
from steerserve.measures import CLOSING_MARKS
from steerserve.reading_level import piece_text

DEFAULT_VERBOSITY_STRENGTH = 6.0
"""Logits the end-of-turn token is pushed up by at verbosity 0 (a quarter of it at level 3). A probe on the
steered default (16 MT-Bench prompts, greedy, 640 tokens, vLLM bf16, the push at every step) gave mean characters
at verbosity 0 -> 4 of 322 -> 540 -> 1053 -> 1154 -> 1277 at strength 6, 272 -> 395 -> 809 -> 950 -> 1277 at 8
(one answer there ended before its first word) and 336 -> 771 -> 944 -> 1241 -> 1495 at 4; the 80-prompt sweeps:
benchmarks/results/verbosity-guidance/."""

_SENTENCE_END = re.compile(rf"[.!?][{re.escape(CLOSING_MARKS)}]*$")  # "end.", 'end."', "end.)", "**end.**"


def push(verbosity: int, strength: float = DEFAULT_VERBOSITY_STRENGTH) -> float:
    """Logits added to the end-of-turn token(s) at a sentence end for this level: 0 at the top level."""
    return round(strength * (MAX_LEVEL - verbosity) / MAX_LEVEL, 4) if strength > 0 else 0.0


@dataclass(frozen=True, eq=False)
class EndGuide:
    """One vocabulary's end-of-turn tokens and the tokens that finish a sentence (build with :func:`end_guide_for`)."""

    end_ids: tuple[int, ...]
    sentence_ends: frozenset[int]
    """Tokens whose text, trailing white space aside, ends in a sentence mark."""
    blanks: frozenset[int]
    """White-space-only tokens (spaces, line breaks) and closing quotes, brackets and emphasis marks, looked past
    when finding the last word."""
    numbers: frozenset[int] = frozenset()
    """Digit-only tokens: a bare mark after one is a list number or a decimal point ("1.", "3."), not an end."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, end_ids: tuple[int, ...] | None = None) -> EndGuide:
        """The guide of ``tokenizer``'s vocabulary; ``end_ids`` where the caller has read them already."""
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(getattr(tokenizer, "all_special_ids", ()))
        ends, blanks, numbers = set(), set(), set()
        for token, piece in enumerate(pieces):
            text = piece_text(piece or "")
            if token in special or not text:
                continue
            if text.isspace() or not text.strip(CLOSING_MARKS + " \n\t"):
                blanks.add(token)
            elif _SENTENCE_END.search(text.rstrip()):
                ends.add(token)
            elif text.strip().isdigit():
                numbers.add(token)
        end_ids = end_token_ids(tokenizer) if end_ids is None else end_ids
        return cls(end_ids, frozenset(ends), frozenset(blanks), frozenset(numbers))

    def at_sentence_end(self, output_ids: Sequence[int]) -> bool:
        """Whether the answer so far ends a sentence (white space and closing marks after it allowed; not a
        number's "1.")."""
        for back, token in enumerate(reversed(output_ids), start=1):
            if token not in self.blanks:
                after_number = back < len(output_ids) and output_ids[-back - 1] in self.numbers
                return token in self.sentence_ends and not after_number
        return False


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


_GUIDES: dict[int, EndGuide] = {}


def end_guide_for(tokenizer: Any) -> EndGuide:
    """One guide per vocabulary and end tokens, shared by the server's variants and adapters."""
    end_ids = end_token_ids(tokenizer)  # reads generation_config.json: once per call
    key = hash((frozenset(tokenizer.get_vocab().items()), end_ids))
    if key not in _GUIDES:
        _GUIDES[key] = EndGuide.from_tokenizer(tokenizer, end_ids)
    return _GUIDES[key]
