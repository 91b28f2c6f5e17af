"""LoRA adapters as model ids: applied per request on their base's engine, or served merged.

Variants (SteerLM, DPO, MCQ fine-tunes) trained as LoRA differ from their base by a few
MB; serving each as a full checkpoint costs a full copy of the weights. An adapter spec
names its base (``base=`` a model id, or a name); on the vLLM engine the adapter becomes a
``LoRARequest`` on the base's engine (one copy of the weights, one batch). Where the base's
engine cannot apply it (the transformers and llama.cpp engines, DoRA, ``merged=true``...)
the merged checkpoint gets an engine of its own and ``/v1/models`` says why. A bitsandbytes
base (nf4, int8) on the transformers engine keeps the adapter unmerged on an engine of its
own instead: a merge would re-quantize the sum, rounding most of the update away (an
adapter trained on that base with ``lora_base_precision: nf4`` is meant to be served so)::

    steerserve serve --model ./tiny,name=tiny --model ./runs/sft-lora,base=tiny:bf16

A training run with ``lora: true`` writes OUTPUT/ (merged model) and OUTPUT/adapter/; either
path works. A bare adapter directory is merged with peft into ``cache_dir/merged/`` once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from steerserve.precision import lora_base_precision
from steerserve.prompts import SteeringMethod
from steerserve.server.engines.base import AdapterConfig, AdaptersUnsupported
from steerserve.server.settings import ServerSettings, VariantSpec
from steerserve.server.variants import (
    Variant, build_variant, guidance_strength, loop_copies, read_manifest, verbosity_strength,
)
from steerserve.staging import staged_directory

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AdapterSource:
    """A PEFT LoRA adapter on disk, and the merged checkpoint a training run wrote beside it."""

    adapter_dir: Path
    merged_dir: Path | None
    """The training output holding ``adapter/`` (its top level is the merged model), if any."""
    config: dict[str, Any]
    """adapter_config.json."""
    manifest: dict[str, Any]

    @property
    def rank(self) -> int:
        """The largest rank of any module (``rank_pattern`` may raise some above ``r``)."""
        return max([int(self.config["r"]), *map(int, (self.config.get("rank_pattern") or {}).values())])

    def tokenizer_dir(self, base_path: Path) -> Path:
        """The adapter's own tokenizer when it saved one, else its base's."""
        return self.adapter_dir if (self.adapter_dir / "tokenizer_config.json").is_file() else base_path

    @property
    def default_name(self) -> str:
        """The training output's name for ``OUTPUT/adapter``, else the adapter directory's."""
        if self.merged_dir is not None or self.adapter_dir.name == "adapter":
            return self.adapter_dir.parent.name
        return self.adapter_dir.name


def find_adapter(path: Path) -> AdapterSource:
    """The adapter at ``path`` (adapter_config.json there, or under ``adapter/``)."""
    if (path / "adapter_config.json").is_file():
        adapter_dir = path
        outer = path.parent if path.name == "adapter" and (path.parent / "config.json").is_file() else None
    elif (path / "adapter" / "adapter_config.json").is_file():
        adapter_dir, outer = path / "adapter", path if (path / "config.json").is_file() else None
    else:
        raise FileNotFoundError(f"{path}: no adapter_config.json there or under adapter/ (not a PEFT adapter)")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise ValueError(f"{adapter_dir}: a {config.get('peft_type')} adapter; only LoRA adapters are served")
    manifest = read_manifest(outer) if outer is not None else read_manifest(adapter_dir)
    return AdapterSource(adapter_dir, outer, config, manifest)


def find_base(base: str, variants: dict[str, Variant]) -> Variant:
    """The checkpoint variant ``base=`` names: a model id, or a name that exactly one variant has."""
    if base in variants:
        return variants[base]
    named = [v for v in variants.values() if v.id.rpartition(":")[0] == base]
    if len(named) != 1:
        known = ", ".join(variants)
        raise ValueError(f"base={base}: {'ambiguous' if named else 'no such variant'}; known: {known}")
    return named[0]


def build_adapter_variant(spec: VariantSpec, settings: ServerSettings, base: Variant) -> Variant:
    """The adapter's variant: LoRA on ``base``'s engine where it can, else the merged checkpoint."""
    source = find_adapter(Path(spec.path).expanduser().resolve())
    name = spec.name or source.manifest.get("name") or source.default_name
    model_id = f"{name}:{base.precision.value}"
    tokenizer = source.tokenizer_dir(base.path)
    steering = spec.steering or source.manifest.get("steering")
    reason = "merged=true was asked for" if spec.merged else None
    _check_trained_precision(source, model_id, base)
    if reason is None:
        try:
            engine = base.engine.adapter_engine(AdapterConfig(model_id, str(source.adapter_dir), source.rank))
        except AdaptersUnsupported as exc:
            reason = str(exc)
        else:
            return dataclasses.replace(
                base, id=model_id, path=source.adapter_dir, engine=engine, manifest=source.manifest,
                steering=SteeringMethod(steering) if steering else None, tokenizer=None, ready=False, error=None,
                tokenizer_path=tokenizer, base=base.id, served_as="lora", served_as_reason=None, prepare=None,
                reading_level_guidance=guidance_strength(spec, settings), reading_guide=None, complexity_biases={},
                verbosity_guidance=verbosity_strength(spec, settings), end_guide=None,
                loop_guard=loop_copies(spec, settings),
            )
    if not base.precision.is_float and base.engine_name == "transformers" and not spec.merged:
        return _unmerged_variant(spec, settings, base, source, model_id, reason)
    return _merged_variant(spec, settings, base, source, model_id, reason)


def _check_trained_precision(source: AdapterSource, model_id: str, base: Variant) -> None:
    """Warn when a QLoRA adapter is served on another precision than the one it was trained on."""
    trained_on = lora_base_precision(source.manifest)
    if trained_on is not None and trained_on is not base.precision:
        logger.warning("adapter %s was trained on a %s base and is served on %s: it learned around the %s "
                       "rounding, which this base does not have", model_id, trained_on.value, base.id,
                       trained_on.value)


def _own_engine_spec(spec: VariantSpec, base: Variant, source: AdapterSource, model_id: str, path: Path) -> VariantSpec:
    """The adapter as a checkpoint at ``path`` on an engine of its own like its base's (precision, engine, steering)."""
    return spec.model_copy(update={
        "path": str(path), "name": model_id.rpartition(":")[0], "precision": base.precision.value,
        "engine": base.engine_name, "steering": spec.steering or source.manifest.get("steering"), "base": None,
    })


def _unmerged_variant(
    spec: VariantSpec, settings: ServerSettings, base: Variant, source: AdapterSource, model_id: str, reason: str
) -> Variant:
    """The base's weights in their (bitsandbytes) precision, the adapter unmerged beside them, on its own engine."""
    unmerged_spec = _own_engine_spec(spec, base, source, model_id, base.path)
    variant = build_variant(unmerged_spec, settings, base.path, adapter=source.adapter_dir)
    why = f"{reason}; a merge into {base.precision.value} weights would round the adapter away"
    logger.info("adapter %s served unmerged on %s weights: %s", model_id, base.precision.value, why)
    tokenizer = source.tokenizer_dir(base.path)
    return dataclasses.replace(variant, path=source.adapter_dir, tokenizer_path=tokenizer, manifest=source.manifest,
                               base=base.id, served_as="unmerged", served_as_reason=why)


def _merged_variant(
    spec: VariantSpec, settings: ServerSettings, base: Variant, source: AdapterSource, model_id: str, reason: str
) -> Variant:
    """The merged checkpoint on an engine like the base's: the training run's, or merged into the cache."""
    if not base.precision.is_float:
        raise ValueError(f"adapter {model_id}: cannot merge into a {base.precision.value} base ({reason})")
    prepare = None
    merged = source.merged_dir
    if merged is None:
        merged = merged_cache_dir(settings.cache_dir, source.adapter_dir, base.path)
        prepare = functools.partial(merge_adapter, base.path, source.adapter_dir, merged)
    merged_spec = _own_engine_spec(spec, base, source, model_id, merged)
    variant = build_variant(merged_spec, settings, merged)
    logger.info("adapter %s served merged from %s: %s", model_id, merged, reason)
    return dataclasses.replace(variant, path=source.adapter_dir, tokenizer_path=merged, manifest=source.manifest,
                               base=base.id, served_as="merged", served_as_reason=reason, prepare=prepare)


def merged_cache_dir(cache_dir: Path, adapter_dir: Path, base_path: Path) -> Path:
    """Where a merge of this adapter (as it is now) into this base lives; a changed adapter merges anew."""
    weights = sorted(adapter_dir.glob("adapter_model.*"))
    stamp = [str(adapter_dir), str(base_path), *(f"{w.name}:{w.stat().st_mtime_ns}:{w.stat().st_size}" for w in weights)]
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "merged" / f"{adapter_dir.parent.name}-{adapter_dir.name}-{digest}"


def merge_adapter(base_path: Path, adapter_dir: Path, target: Path) -> Path:
    """Merge with peft in float32, save in the base's dtype at ``target`` (atomically); skip if done."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        from peft import PeftModel
    except ImportError:
        raise RuntimeError(f"merging the adapter {adapter_dir} needs peft: pip install -e '.[train]'") from None

    dtype = getattr(AutoConfig.from_pretrained(base_path), "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with staged_directory(target) as work:
        merged.to(dtype).save_pretrained(work)
        tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(work)
    logger.info("merged %s into %s at %s", adapter_dir, base_path, target)
    return target


def add_adapters(specs: list[VariantSpec], settings: ServerSettings, variants: dict[str, Variant]) -> list[Variant]:
    """Adapter variants for the specs with ``base=``, each on a variant of ``variants``."""
    adapters = []
    for spec in specs:
        assert spec.base is not None
        adapters.append(build_adapter_variant(spec, settings, find_base(spec.base, variants)))
    return adapters

