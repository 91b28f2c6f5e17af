"""Reading-level guidance: which tokens the complexity slider pushes, and how hard per level."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from steerserve.reading_level import DEFAULT_STRENGTH, ReadingLevelGuide, guide_for, piece_text, token_scores


@pytest.mark.parametrize(("piece", "score", "ends"), [
    ("Ġthe", 0.0, False),            # a one-syllable word costs nothing
    ("Ġcomplicated", 3.0, False),    # four syllables: three beyond a short word
    ("The", 0.0, False),             # a capital at a line start begins a word
    ("ing", 1.0, False),             # glued on: lengthens the word before it
    ("s", 0.0, False),               # no vowel, no syllable ("cats")
    ("Ġhello,", 1.0, False),         # punctuation around the letters is set aside
    ("(world", 0.0, False),
    ("Ġ\"Amazing", 2.0, False),
    ("▁photosynthesis", 4.0, False),  # SentencePiece's word marker
    (".", 0.0, True),
    ("Ġ?", 0.0, True),
    (".Ċ", 0.0, True),
    ('."', 0.0, True),
    ("...", 0.0, False),             # an ellipsis is not a sentence end
    ("Ġ3.", 0.0, False),
    ("123", 0.0, False),
    ("Ã©", 0.0, False),              # a byte-level piece of a non-ASCII character
])
def test_token_scores(piece: str, score: float, ends: bool) -> None:
    assert token_scores([piece]) == ([score], [ends])


def test_piece_text_spells_out_markers() -> None:
    assert piece_text("Ġword") == " word" and piece_text("▁word") == " word" and piece_text(".Ċ") == ".\n"


def test_bias_grows_linearly_from_none_at_level_4(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    guide = ReadingLevelGuide.from_tokenizer(tokenizer)
    assert guide.scores and guide.sentence_ends
    special = set(tokenizer.all_special_ids)
    assert not special & {token for token, _ in guide.scores} and not special & set(guide.sentence_ends)
    assert guide.logit_bias(4) == {} and guide.logit_bias(0, strength=0.0) == {}
    plainest, middle = guide.logit_bias(0), guide.logit_bias(2)
    for token, score in guide.scores:
        assert plainest[token] == pytest.approx(-DEFAULT_STRENGTH * score)
        assert middle[token] == pytest.approx(plainest[token] / 2)
    assert all(plainest[token] == DEFAULT_STRENGTH for token in guide.sentence_ends)
    assert set(plainest) == {token for token, _ in guide.scores} | set(guide.sentence_ends)
    assert guide.logit_bias(0) is plainest  # made once per level and strength, shared by every request


def test_one_guide_per_vocabulary(tiny_model_dir: Path) -> None:
    first, again = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert guide_for(first) is guide_for(again)
