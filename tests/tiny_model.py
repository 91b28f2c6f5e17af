"""Tiny random Llama checkpoints for tests: the same builder the ``model: tiny`` recipes use.

    path = build_tiny_model(tmp_path / "tiny")             # ChatML template
    path = build_tiny_model(tmp_path / "raw", chat_template=False)
"""

from steerserve.training.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_model

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_model"]
