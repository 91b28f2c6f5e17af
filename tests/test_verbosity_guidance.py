"""The verbosity slider's end push: its size per level, where an answer ends a sentence, which tokens end one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from steerserve.verbosity_guidance import DEFAULT_VERBOSITY_STRENGTH, EndGuide, end_guide_for, end_token_ids, push


def test_push_falls_linearly_to_nothing_at_the_top_level() -> None:
    assert [push(level, 6.0) for level in range(5)] == [6.0, 4.5, 3.0, 1.5, 0.0]
    assert push(0, 0.0) == 0.0 and push(0) == DEFAULT_VERBOSITY_STRENGTH


@pytest.fixture(scope="module")
def guide(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tokenizer, end_guide_for(tokenizer)


@pytest.mark.parametrize(("text", "ends"), [
    ("It is done.", True), ("It is done.\n\n", True), ('He said "go."', True), ("Really?", True),
    ("**Done.**\n", True), ("Wow!", True),
    ("Consider the following:\n\n", False), ("Here are the tips:\n\n1.", False), ("Pi is about 3.", False),
    ("It is done", False), ("", False),
])
def test_a_push_waits_for_a_finished_sentence(guide: tuple, text: str, ends: bool) -> None:
    """Mid-sentence, after a colon or a list number the end token is left alone: the push only brings forward an
    end the model saw coming after a full stop."""
    tokenizer, end_guide = guide
    assert end_guide.at_sentence_end(tokenizer.encode(text, add_special_tokens=False)) is ends


def test_the_samplers_push_the_end_token_only_at_a_sentence_end(guide: tuple) -> None:
    from steerserve.server.engines.base import EndPush, SamplingOptions
    from steerserve.server.engines.sampling import adjust_logits

    tokenizer, end_guide = guide
    options = SamplingOptions(max_tokens=8, end_push=EndPush(end_guide, 1, 6.0))
    assert options.adjusts_logits
    for text, pushed in (("Done.", 4.5), ("Done", 0.0)):
        logits = torch.zeros(len(tokenizer))
        adjust_logits(logits, [1], tokenizer.encode(text, add_special_tokens=False), options, end_guide.end_ids)
        assert logits[list(end_guide.end_ids)].tolist() == [pushed] * len(end_guide.end_ids)
        assert logits.sum().item() == pushed * len(end_guide.end_ids)


def test_end_tokens_are_the_tokenizers_and_the_generation_configs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.eos_token_id in end_token_ids(tokenizer)
    copy = tmp_path / "tokenizer"
    shutil.copytree(tiny_model_dir, copy)
    other = 1 if tokenizer.eos_token_id != 1 else 3
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, other]}))
    both = AutoTokenizer.from_pretrained(copy)
    assert end_token_ids(both) == tuple(sorted({tokenizer.eos_token_id, other}))
    assert isinstance(end_guide_for(both), EndGuide) and end_guide_for(both).end_ids == end_token_ids(both)


@pytest.mark.parametrize("strength", [-1.0, 10.5])
def test_strength_is_bounded_in_the_settings(strength: float) -> None:
    from pydantic import ValidationError

    from steerserve.server.settings import ServerSettings

    with pytest.raises(ValidationError, match="verbosity_guidance"):
        ServerSettings(verbosity_guidance=strength)
