"""Engine registry: pick an engine by name, import its module only when used.

    engine_cls = load_engine_class("vllm")   # vLLM's import takes seconds; only pay for it when asked
"""

from __future__ import annotations

import importlib

from steerserve.server.engines.base import Engine

# name -> "module:Class"; a new engine (llama.cpp, ...) is one line here, no route changes.
ENGINES: dict[str, str] = {
    "vllm": "steerserve.server.engines.vllm_engine:VLLMEngine",
    "transformers": "steerserve.server.engines.hf_engine:TransformersEngine",
    "llama.cpp": "steerserve.server.engines.llamacpp_engine:LlamaCppEngine",
}


def load_engine_class(name: str) -> type[Engine]:
    """The engine class registered under ``name``; ValueError naming the known ones otherwise."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
