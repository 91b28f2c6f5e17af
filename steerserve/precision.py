"""The one precision enum: what a variant's weights are stored as, and who serves them.

A served model id is ``name:precision`` (``steer-base:bf16``); quantization,
serving and benchmarks all name precisions through :class:`Precision`.
"""

from __future__ import annotations

import enum


class Precision(str, enum.Enum):
    """Weight precision of a variant (the value is the id suffix)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    GPTQ_W4 = "gptq-w4"
    GPTQ_W8 = "gptq-w8"
    W4A16 = "w4a16"
    W8A8 = "w8a8"
    INT8 = "int8"
    NF4 = "nf4"
    GGUF_Q8_0 = "gguf-q8_0"
    GGUF_Q4_K_M = "gguf-q4_k_m"

    @property
    def torch_dtype_name(self) -> str:
        """The float dtype the engine computes in for this precision."""
        return {Precision.FP32: "float32", Precision.FP16: "float16"}.get(self, "bfloat16")

    @property
    def is_float(self) -> bool:
        """Plain float checkpoints (a cast, no quantization)."""
        return self in FLOAT_PRECISIONS


FLOAT_PRECISIONS = frozenset({Precision.FP32, Precision.BF16, Precision.FP16})

# Engines able to serve each precision, preferred first (see server.engines.ENGINES).
SERVING_ENGINES: dict[Precision, tuple[str, ...]] = {
    Precision.FP32: ("vllm", "transformers"),
    Precision.BF16: ("vllm", "transformers"),
    Precision.FP16: ("vllm", "transformers"),
    Precision.GPTQ_W4: ("vllm",),
    Precision.GPTQ_W8: ("vllm",),
    Precision.W4A16: ("vllm",),
    Precision.W8A8: ("vllm",),
    Precision.INT8: ("transformers",),
    Precision.NF4: ("transformers",),
    Precision.GGUF_Q8_0: ("llama.cpp",),
    Precision.GGUF_Q4_K_M: ("llama.cpp",),
}
