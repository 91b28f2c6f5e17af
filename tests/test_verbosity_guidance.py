"""The verbosity slider's end-token push: its size per level, and which tokens end an answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerserve.verbosity_guidance import DEFAULT_VERBOSITY_STRENGTH, end_token_ids, verbosity_bias


def test_push_falls_linearly_to_nothing_at_the_top_level() -> None:
    assert [verbosity_bias((2,), level, 6.0) for level in range(5)] == [
        {2: 6.0}, {2: 4.5}, {2: 3.0}, {2: 1.5}, {}]
    assert verbosity_bias((0, 2), 1, 2.0) == {0: 1.5, 2: 1.5}
    assert verbosity_bias((2,), 0, 0.0) == {}
    assert verbosity_bias((2,), 0) == {2: DEFAULT_VERBOSITY_STRENGTH}


def test_end_tokens_are_the_tokenizers_and_the_generation_configs(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.eos_token_id in end_token_ids(tokenizer)
    copy = tmp_path / "tokenizer"
    shutil.copytree(tiny_model_dir, copy)
    other = 1 if tokenizer.eos_token_id != 1 else 3
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, other]}))
    assert end_token_ids(AutoTokenizer.from_pretrained(copy)) == tuple(sorted({tokenizer.eos_token_id, other}))


@pytest.mark.parametrize("strength", [-1.0, 10.5])
def test_strength_is_bounded_in_the_settings(strength: float) -> None:
    from pydantic import ValidationError

    from steerserve.server.settings import ServerSettings

    with pytest.raises(ValidationError, match="verbosity_guidance"):
        ServerSettings(verbosity_guidance=strength)
