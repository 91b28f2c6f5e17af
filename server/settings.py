"""Server configuration: ``STEERSERVE_*`` environment variables, a YAML file, CLI flags.

    STEERSERVE_API_KEY=sk-local steerserve serve --model ./ckpt --engine transformers
    steerserve serve --model ./base,name=base --model ./runs/sft-lora,base=base:bf16   # + a LoRA adapter
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from steerserve.default_model import CACHE_DIR
from steerserve.loop_guard import DEFAULT_LOOP_REPEATS, LoopCopies
from steerserve.reading_level import DEFAULT_STRENGTH
from steerserve.verbosity_guidance import DEFAULT_VERBOSITY_STRENGTH


class VariantSpec(BaseSettings):
    """One served variant: a checkpoint at one precision, on one engine."""

    model_config = SettingsConfigDict(extra="forbid")

    path: str
    """Checkpoint directory, or ``default`` for the default model (``default:nf4``: quantized once, GPTQ-rounded)."""
    name: str | None = None
    """Model id prefix; defaults to the manifest's name or the directory name."""
    precision: str | None = None
    """Defaults to the manifest's precision or bf16."""
    engine: str | None = None
    """Defaults to the server's --engine (or the first engine able to serve the precision)."""
    steering: str | None = None
    """steerlm, chat-template, instructions or described; defaults to the manifest's, else by chat template."""
    max_model_len: int | None = None
    engine_args: dict[str, Any] = Field(default_factory=dict)
    base: str | None = None
    """Serve ``path`` as a PEFT LoRA adapter on this variant (its model id, or its name): ``path`` is the
    adapter directory (adapter_config.json) or a training output holding it under ``adapter/``."""
    merged: bool = False
    """Adapters: serve the merged checkpoint on an engine of its own even where LoRA per request works."""
    reading_level_guidance: float | None = Field(None, ge=0.0, le=10.0)
    """This variant's complexity-slider strength (the server's ``reading_level_guidance`` when unset)."""
    verbosity_guidance: float | None = Field(None, ge=0.0, le=10.0)
    """This variant's verbosity-slider strength (the server's ``verbosity_guidance`` when unset)."""
    loop_guard: LoopCopies | None = None
    """This variant's loop guard (the server's ``loop_guard`` when unset)."""

    @classmethod
    def parse(cls, text: str) -> VariantSpec:
        """``PATH[,key=value...]`` from the command line, e.g. ``./ckpt,name=steer,precision=bf16``.

        ``engine_args.KEY=VALUE`` sets one engine argument for this variant alone (the value is read as
        YAML), e.g. ``default,name=compiled,engine_args.enforce_eager=false`` beside an eager ``default``.
        Dotted keys nest, for arguments that take a mapping:
        ``engine_args.speculative_config.method=ngram,engine_args.speculative_config.num_speculative_tokens=4``.
        """
        path, *pairs = text.split(",")
        fields: dict[str, Any] = {"path": path}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"--model option {pair!r} is not key=value")
            key = key.strip().replace("-", "_")
            if key.startswith("engine_args."):
                *parents, leaf = key.removeprefix("engine_args.").split(".")
                target = fields.setdefault("engine_args", {})
                for parent in parents:
                    target = target.setdefault(parent, {})
                    if not isinstance(target, dict):
                        raise ValueError(f"--model option {pair!r}: engine_args.{parent} is already a value")
                target[leaf] = yaml.safe_load(value)
            else:
                fields[key] = value.strip()
        return cls(**fields)


class ServerSettings(BaseSettings):
    """Everything ``steerserve serve`` can be told."""

    model_config = SettingsConfigDict(env_prefix="STEERSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """When set, every route but /health needs ``Authorization: Bearer <key>``."""
    engine: str = "vllm"
    """Default engine for variants that do not name one."""
    models: list[VariantSpec] = Field(default_factory=list)
    max_model_len: int = 2048
    max_num_seqs: int = 16
    kv_cache_gib: float = 2.0
    enforce_eager: bool = False
    """vLLM: False (default) torch.compiles the model at start (~2 min the first time, then read from the cache
    under ~/.cache/vllm) for +17% single-stream and +19% at 8 streams on CPU (benchmarks/NOTES.md); True starts
    in ~25 s. The test suite sets STEERSERVE_ENFORCE_EAGER=true: each tiny test model would compile on its own."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM variants: GPUs each layer is split across (CUDA only; refused on CPU)."""
    pipeline_parallel_size: int = Field(1, ge=1)
    """vLLM variants: GPUs the layers are staged across (CUDA only; refused on CPU)."""
    reading_level_guidance: float = Field(DEFAULT_STRENGTH, ge=0.0, le=10.0)
    """Logits per syllable the complexity slider pushes with at level 0, falling linearly to none at level 4
    (steerserve.reading_level); 0 leaves complexity to the prompt alone."""
    verbosity_guidance: float = Field(DEFAULT_VERBOSITY_STRENGTH, ge=0.0, le=10.0)
    """Logits the verbosity slider pushes the end-of-turn token up by at level 0, falling linearly to none at
    level 4 (steerserve.verbosity_guidance); 0 leaves verbosity to the prompt alone."""
    loop_guard: LoopCopies = DEFAULT_LOOP_REPEATS
    """An answer ends once its tail repeats the same stretch of tokens (up to 64) this many times in a row
    (steerserve.loop_guard); 0 lets loops run to max_tokens."""
    default_max_tokens: int = 512
    """max_tokens when a request gives none (capped by what the context leaves)."""
    max_tokens_limit: int = 4096
    """Largest max_tokens a request may ask for."""
    max_queue: int = 128
    """Requests a variant holds waiting beyond its batch (max_num_seqs); past it: 429 + Retry-After."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM: stop accepting, let in-flight requests finish this long, then abort the rest."""
    cache_dir: Path = CACHE_DIR
    """Where the default model's converted checkpoint (and its ``default:<precision>`` builds) live."""
    log_level: str = "info"

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        from steerserve.server.engines import ENGINES

        if value not in ENGINES:
            raise ValueError(f"unknown engine {value!r}; known engines: {', '.join(sorted(ENGINES))}")
        return value

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> ServerSettings:
        """Settings from a YAML file (``models: [{path: ..., precision: ...}]``), flags on top."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)
