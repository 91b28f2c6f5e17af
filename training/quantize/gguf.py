"""gguf-q8_0 / gguf-q4_k_m for a llama.cpp engine: not built yet; refuses in one line.

    steerserve quantize default --precision gguf-q4_k_m --output runs/smollm2-q4km   # exit 3 + reason

The plan (see /work/shared/MODELS.md): write an f16 GGUF with the ``gguf`` package,
then ``llama_cpp.llama_model_quantize`` to Q8_0 / Q4_K_M, served by a llama.cpp
engine. Both the quantize step and the engine need llama-cpp-python, an optional
extra that compiles for ~10 minutes (``pip install -e '.[llamacpp]'``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from steerserve.precision import Precision
from steerserve.training.quantize.methods import MethodResult, QuantizeJob, Unavailable

INSTALL_HINT = "pip install llama-cpp-python==0.3.36 (compiles ~10 min; extra: '.[llamacpp]')"


def check(precision: Precision) -> None:
    """One-line refusal: llama-cpp-python missing, or (when present) the converter not written yet."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise Unavailable(f"llama-cpp-python is not installed, so {precision.value} cannot be made or served; "
                          f"{INSTALL_HINT}")
    raise Unavailable(f"{precision.value}: the HF -> GGUF converter and the llama.cpp engine are not implemented yet")


def quantize(job: QuantizeJob, work: Path) -> MethodResult:
    check(job.precision)
    raise AssertionError("unreachable")


def score_gguf(model_dir: Path, eval_set: dict[str, Any]) -> dict[str, Any]:
    raise Unavailable("scoring GGUF variants needs the llama.cpp engine, which is not implemented yet")
