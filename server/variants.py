"""Served variants: one model id per checkpoint x precision, each with its engine.

A checkpoint directory may carry ``manifest.json`` (written by training and
quantization) naming its ``name``, ``precision`` and ``steering`` method; flags
and config override it. The id is ``name:precision``, e.g. ``steer-base:bf16``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerserve.attributes import resolve_attributes
from steerserve.nf4_correction import CORRECTION_FILE, has_correction
from steerserve.precision import NEEDS_CPU_AVX512, NEEDS_CUDA, SERVING_ENGINES, Precision
from steerserve.prompts import SteeringMethod, render_chat, stop_strings
from steerserve.reading_level import ReadingLevelGuide, guide_for
from steerserve.verbosity_guidance import EndGuide, end_guide_for
from steerserve.server.engines import load_engine_class
from steerserve.server.engines.base import EndPush, Engine, EngineConfig, LogitBias
from steerserve.server.errors import APIError, model_not_found
from steerserve.server.settings import ServerSettings, VariantSpec

logger = logging.getLogger(__name__)


def read_manifest(path: Path) -> dict[str, Any]:
    """The checkpoint's manifest.json, or {} when it has none."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return {}
    data = json.loads(manifest.read_text())
    return data if isinstance(data, dict) else {}


@dataclass
class Variant:
    """A loaded (or loading) model id with everything requests need."""

    id: str
    path: Path
    precision: Precision
    engine_name: str
    steering: SteeringMethod | None
    """None until the tokenizer is loaded and the method decided."""
    max_model_len: int
    engine: Engine
    tokenizer: Any = None
    ready: bool = False
    error: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    tokenizer_path: Path | None = None
    """Where the tokenizer lives when not at ``path`` (an adapter without its own uses its base's)."""
    base: str | None = None
    """For a LoRA adapter: the model id of the variant it is applied to."""
    served_as: str | None = None
    """For a LoRA adapter: "lora" (applied per request on the base's engine), "merged" or "unmerged" (own
    engine; unmerged on a quantized base)."""
    served_as_reason: str | None = None
    """Why an adapter is not applied per request on its base's engine, in one line."""
    prepare: Callable[[], None] | None = None
    """Blocking work before the engine starts (merging an adapter into a cache dir); run off the loop."""
    reading_level_guidance: float = 0.0
    """Logits per syllable the complexity slider pushes with at level 0 (:mod:`steerserve.reading_level`)."""
    reading_guide: ReadingLevelGuide | None = None
    """This tokenizer's reading-level scores; built with the tokenizer when guidance is on."""
    complexity_biases: dict[int, LogitBias] = field(default_factory=dict, repr=False)
    """The bias per complexity level, made on first use."""
    verbosity_guidance: float = 0.0
    """Logits the verbosity slider pushes the end-of-turn token up by at level 0
    (:mod:`steerserve.verbosity_guidance`)."""
    end_guide: EndGuide | None = None
    """This tokenizer's end-of-turn and sentence-end tokens; built with the tokenizer when verbosity guidance is on."""
    loop_guard: int = 0
    """Copies in a row of a stretch of tokens that end an answer (:mod:`steerserve.loop_guard`); 0: off."""

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def render(self, messages: list[dict[str, str]], attributes: dict[str, int] | None, prefix: str = "") -> str:
        """The exact prompt a chat request becomes for this model."""
        assert self.steering is not None
        template = self.apply_template if self.tokenizer.chat_template else None
        return render_chat(messages, attributes, self.steering, template, assistant_prefix=prefix)

    def stops(self) -> list[str]:
        return stop_strings(self.steering) if self.steering else []

    def complexity_bias(self, attributes: dict[str, int] | None) -> LogitBias | None:
        """The reading-level logit bias of a request's complexity slider; None at level 4 (the default) or
        when guidance is off. One shared bias per level, so its tensors are built once."""
        if self.reading_guide is None or attributes is None:
            return None
        level = resolve_attributes(attributes)["complexity"]
        if level not in self.complexity_biases:
            bias = self.reading_guide.logit_bias(level, self.reading_level_guidance)
            self.complexity_biases[level] = LogitBias.of(bias, (level, self.reading_level_guidance))
        bias = self.complexity_biases[level]
        return bias if bias.ids else None

    def end_push(self, attributes: dict[str, int] | None) -> EndPush | None:
        """The end-of-turn push of a request's verbosity slider; None at level 4 (the default) or when guidance
        is off."""
        if self.end_guide is None or attributes is None:
            return None
        end_push = EndPush(self.end_guide, resolve_attributes(attributes)["verbosity"], self.verbosity_guidance)
        return end_push if end_push.logits > 0 else None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered prompt; no second BOS when the template wrote one."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]


def default_steering(tokenizer: Any) -> SteeringMethod:
    """A model with its own chat template gets plain-language instructions; others the SteerLM format."""
    return SteeringMethod.INSTRUCTIONS if tokenizer.chat_template else SteeringMethod.STEERLM


def _unavailable_here(precision: Precision, engine: str) -> str | None:
    """Why ``engine`` cannot serve ``precision`` on this machine (GPU-only or AVX-512-only kernels), or None."""
    if (precision, engine) not in NEEDS_CUDA | NEEDS_CPU_AVX512:
        return None
    from steerserve.server.engines.vllm_args import detect_platform, precision_unavailable

    return precision_unavailable(precision, detect_platform())


def _pick_engine(precision: Precision, requested: str | None, default: str, corrected: bool = False) -> str:
    """The engine for this precision here: the requested one if it can, else ``default`` or the first able one.
    A ``corrected`` checkpoint (an nf4 error correction beside its weights) needs the transformers engine, the one
    that adds the correction: vLLM's bitsandbytes loader would serve the 4-bit weights without it."""
    able = ("transformers",) if corrected else SERVING_ENGINES[precision]
    if requested and requested not in able:
        why = f" ({CORRECTION_FILE} beside the weights: only the transformers engine adds it)" if corrected else ""
        raise ValueError(f"precision {precision.value} cannot be served by engine {requested!r} (only {able}){why}")
    reasons = {engine: reason for engine in able if (reason := _unavailable_here(precision, engine))}
    if requested in reasons:
        raise ValueError(f"precision {precision.value} on engine {requested!r}: {reasons[requested]}")
    usable = [engine for engine in able if engine not in reasons]
    if not usable:
        raise ValueError(f"precision {precision.value} cannot be served here: {'; '.join(reasons.values())}")
    if requested:
        return requested
    return default if default in usable else usable[0]


def _parallel_sizes(engine_name: str, settings: ServerSettings) -> tuple[int, int]:
    """Tensor/pipeline parallel sizes for a vLLM variant, refused (one line) where the GPUs are missing."""
    sizes = (settings.tensor_parallel_size, settings.pipeline_parallel_size)
    if engine_name != "vllm" or sizes == (1, 1):
        return 1, 1
    from steerserve.server.engines.vllm_args import check_parallel, detect_platform

    check_parallel(*sizes, detect_platform())
    return sizes


def build_variant(spec: VariantSpec, settings: ServerSettings, path: Path, adapter: Path | None = None) -> Variant:
    """Resolve names, precision, engine and steering for one spec (no weights loaded yet); ``adapter`` is kept
    unmerged on the weights (EngineConfig.adapter)."""
    manifest = read_manifest(path)
    precision = Precision(spec.precision or manifest.get("precision") or Precision.BF16.value)
    corrected = precision is Precision.NF4 and has_correction(path)  # load_model adds it to nf4 only
    engine_name = _pick_engine(precision, spec.engine, settings.engine, corrected)
    name = spec.name or manifest.get("name") or path.name
    steering = spec.steering or manifest.get("steering")
    max_len = spec.max_model_len or settings.max_model_len
    tensor_parallel, pipeline_parallel = _parallel_sizes(engine_name, settings)
    config = EngineConfig(
        model=str(path),
        precision=precision,
        max_model_len=max_len,
        max_num_seqs=settings.max_num_seqs,
        kv_cache_gib=settings.kv_cache_gib,
        enforce_eager=settings.enforce_eager,
        tensor_parallel_size=tensor_parallel,
        pipeline_parallel_size=pipeline_parallel,
        reading_level_guidance=guidance_strength(spec, settings),
        adapter=str(adapter) if adapter else None,
        extra=dict(spec.engine_args),
    )
    return Variant(
        id=f"{name}:{precision.value}",
        path=path,
        precision=precision,
        engine_name=engine_name,
        steering=SteeringMethod(steering) if steering else None,
        max_model_len=max_len,
        engine=load_engine_class(engine_name)(config),
        manifest=manifest,
        reading_level_guidance=guidance_strength(spec, settings),
        verbosity_guidance=verbosity_strength(spec, settings),
        loop_guard=loop_copies(spec, settings),
    )


def guidance_strength(spec: VariantSpec, settings: ServerSettings) -> float:
    """The variant's own ``reading_level_guidance``, else the server's."""
    return settings.reading_level_guidance if spec.reading_level_guidance is None else spec.reading_level_guidance


def verbosity_strength(spec: VariantSpec, settings: ServerSettings) -> float:
    """The variant's own ``verbosity_guidance``, else the server's."""
    return settings.verbosity_guidance if spec.verbosity_guidance is None else spec.verbosity_guidance


def loop_copies(spec: VariantSpec, settings: ServerSettings) -> int:
    """The variant's own ``loop_guard``, else the server's."""
    return settings.loop_guard if spec.loop_guard is None else spec.loop_guard


def prepare_variant(variant: Variant) -> None:
    """The blocking work before a variant's engine starts: merging (if any), its tokenizer, its steering method.

    Separate from the engine start so the offline vLLM benchmark reference renders prompts exactly as served.
    """
    from transformers import AutoTokenizer

    if variant.prepare is not None:
        variant.prepare()
    variant.tokenizer = AutoTokenizer.from_pretrained(str(variant.tokenizer_path or variant.path))
    variant.steering = variant.steering or default_steering(variant.tokenizer)
    if variant.steering is not SteeringMethod.STEERLM and not variant.tokenizer.chat_template:
        raise ValueError(f"steering {variant.steering.value!r} needs a chat template; the tokenizer has none")
    if variant.reading_level_guidance > 0:
        variant.reading_guide = guide_for(variant.tokenizer)
    if variant.verbosity_guidance > 0:
        variant.end_guide = end_guide_for(variant.tokenizer)


class VariantRegistry:
    """All variants of one server; loads them in the background so /health can say 503 meanwhile."""

    def __init__(self, settings: ServerSettings, variants: list[Variant]) -> None:
        self.settings = settings
        self.variants = {v.id: v for v in variants}
        if len(self.variants) != len(variants):
            raise ValueError("two --model entries resolve to the same model id; give one a name=")

    @property
    def ready(self) -> bool:
        return all(v.ready for v in self.variants.values())

    def get(self, model_id: str) -> Variant:
        """The variant named by a request; 404 if unknown, 503 while it loads."""
        variant = self.variants.get(model_id)
        if variant is None:
            raise model_not_found(model_id, list(self.variants))
        if not variant.ready:
            detail = f"failed to load: {variant.error}" if variant.error else "still loading"
            raise APIError(503, f"model {model_id!r} is {detail}", param="model", code="model_not_ready")
        return variant

    async def load_all(self) -> None:
        """Start every engine, one after another (two 2-core engine starts at once only slow both)."""
        for variant in self.variants.values():
            await self._load(variant)

    async def _load(self, variant: Variant) -> None:
        try:
            await asyncio.to_thread(prepare_variant, variant)
            await variant.engine.start()
            variant.ready = True
            logger.info("variant %s ready (%s, %s)", variant.id, variant.engine_name, variant.steering.value)
        except Exception as exc:  # a broken variant must not take the others down
            variant.error = f"{type(exc).__name__}: {exc}"
            logger.exception("variant %s failed to load", variant.id)

    async def shutdown(self) -> None:
        for variant in self.variants.values():
            variant.ready = False
            await variant.engine.shutdown()
