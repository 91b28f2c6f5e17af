"""Recipe configuration: one dataclass per recipe, loaded from YAML, overridden by ``--set key=value``.

Every field carries its help text in ``metadata["help"]`` (shown by
``steerserve train <recipe> --help``); each recipe validates its values in
``__post_init__``::

    config = load_config(SFTConfig, "training/recipes/sft-tiny.yaml", ["max_steps=5", "lora=true"])

Relative paths (``model``, ``data``, ...) are looked up, first hit wins, against
(1) the current directory, (2) the YAML file's directory, (3) the project root
(the folder holding ``training/``, so ``../shared/data/...`` in the shipped
recipes works from anywhere in an editable install). A path found nowhere is
kept as written: a Hugging Face name for ``data``/``model``, else an error later.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from steerserve.default_model import DEFAULT_MODEL, default_precision

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY_MODELS = ("tiny", "tiny-raw")
QLORA_PRECISIONS = ("nf4",)
"""Base precisions a LoRA run can train on (``lora_base_precision``): bitsandbytes 4-bit, as the server loads it."""

C = TypeVar("C", bound="CommonConfig")


class ConfigError(ValueError):
    """A bad recipe file or override; the message names the key."""


def option(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - "help" reads best at call sites
    """A dataclass field with help text (lists/dicts get a factory)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass
class CommonConfig:
    """What every recipe has: a model, data and the seed; validation helpers."""

    PATH_FIELDS: typing.ClassVar[tuple[str, ...]] = ("model", "data")

    model: str = option("tiny", "Base model: a local checkpoint directory, a hub name (online only), 'default' "
                                "(the server's default model, SmolLM2-135M-Instruct, converted once into the cache), "
                                "or 'tiny' / 'tiny-raw' to build a tiny random Llama (with / without a chat "
                                "template) offline.")
    data: str = option("", "Data: a file, a directory of files, or a Hugging Face data set name ('name:config').")
    data_format: str = option("", "Format of `data` (see the recipe's data formats).")
    data_split: str = option("train", "Split to read when `data` is a hub data set.")
    seed: int = option(0, "Seed for the split, shuffles and weight init.")
    limit: int | None = option(None, "Use at most this many loaded rows (before any split), to run small.")

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data: required (a file, directory or hub name)")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"limit: must be at least 2 rows, got {self.limit}")

    def check_choice(self, name: str, choices: typing.Iterable[str]) -> None:
        """ConfigError naming the field unless its value is one of ``choices``."""
        choices = tuple(choices)
        if getattr(self, name) not in choices:
            raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(map(str, choices))}")

    def check_extra_formats(self, formats: typing.Iterable[str]) -> None:
        """ConfigError naming extra_data unless every extra source's format is one of ``formats``."""
        formats = tuple(formats)
        for entry in getattr(self, "extra_data", []):
            data_format = parse_source(entry)[0]
            if data_format not in formats:
                raise ConfigError(f"extra_data: format {data_format!r} of {entry!r} is not one of "
                                  f"{', '.join(formats)} (it must mix with data_format {self.data_format!r})")

    def check_positive(self, *names: str) -> None:
        """ConfigError naming the first field that is below 1."""
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BaseConfig(CommonConfig):
    """What every training recipe has: split, run length and optimizer basics."""

    test_fraction: float = option(0.1, "Share of prompt groups held out for evaluation (grouped by prompt).")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: run `epochs`).")
    epochs: float = option(1.0, "Passes over the training split when max_steps is -1.")
    learning_rate: float = option(1e-4, "Peak learning rate (linear decay).")
    batch_size: int = option(4, "Rows per optimizer step per device (before accumulation).")
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimizer step.")
    eval_batch_size: int = option(8, "Rows per forward pass when evaluating.")
    max_length: int = option(512, "Longest tokenized sequence; longer ones are truncated.")
    logging_steps: int = option(5, "Log (progress bar + logs/train_log.jsonl) every this many steps.")
    save_steps: int = option(50, "Checkpoint every this many steps; a rerun resumes from the last one.")
    gradient_checkpointing: bool = option(False, "Trade compute for memory (off: tiny models on CPU).")
    keep_checkpoints: bool = option(False, "Keep checkpoints/ in the finished output (off: only the final model).")
    eval_limit: int | None = option(None, "Evaluate on at most this many held-out rows per source (the held-out "
                                          "part itself does not change; null: all of it).")
    extra_data: list[str] = option([], "More sources mixed in, each 'FORMAT:PATH' or 'FORMAT:PATH@LIMIT'. Every "
                                       "source is split on its own (same rule and seed), so a source's held-out "
                                       "part never depends on what it is mixed with.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for entry in self.extra_data:
            parse_source(entry)
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction: must be in [0, 1), got {self.test_fraction}")
        self.check_positive("batch_size", "gradient_accumulation_steps", "eval_batch_size", "max_length",
                            "logging_steps", "save_steps")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps: must be -1 or positive, got {self.max_steps}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate: must be positive, got {self.learning_rate}")


@dataclasses.dataclass
class LoraFields:
    """Optional LoRA (peft) for the recipes that fine-tune a causal LM."""

    lora: bool = option(False, "Train a LoRA adapter instead of all weights (saved under adapter/ and merged).")
    lora_r: int = option(8, "LoRA rank.")
    lora_alpha: int = option(16, "LoRA scaling numerator (alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA path.")
    lora_target_modules: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj"],
                                            "Module names that get adapters.")
    lora_layers: int | None = option(None, "Adapters only in the last N decoder layers (null: all). Backward "
                                           "stops below the lowest adapter, so a CPU step costs much less.")
    lora_base_precision: str | None = option(
        None, "QLoRA: hold the frozen base in this bitsandbytes precision (nf4) while the adapter trains, so the "
              "adapter learns around the quantization error of the variant that will serve it. Serve the adapter "
              "on that precision of the base (unmerged: merging into 4-bit weights rounds most of it away); the "
              "output's top level is the dequantized base with the adapter merged, in float.")

    def check_lora(self) -> None:
        """ConfigError naming the LoRA field that cannot work."""
        model = str(getattr(self, "model", ""))
        quantized = default_precision(model)
        if quantized not in (None, "bf16") and self.lora_base_precision != quantized:
            raise ConfigError(f"model: {model} is quantized; train an adapter on it with lora: true and "
                              f"lora_base_precision: {quantized}")
        if self.lora_base_precision is None:
            return
        if not self.lora:
            raise ConfigError("lora_base_precision: a quantized base trains only an adapter; set lora: true")
        if self.lora_base_precision not in QLORA_PRECISIONS:
            raise ConfigError(f"lora_base_precision: {self.lora_base_precision!r} is not one of "
                              f"{', '.join(QLORA_PRECISIONS)}")


def parse_source(entry: str) -> tuple[str, str, int | None]:
    """``"aqua:data/dev.json@100"`` -> ``("aqua", "data/dev.json", 100)``; ConfigError naming extra_data."""
    data_format, sep, rest = entry.partition(":")
    path, at, limit = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if not sep or not data_format or not path:
        raise ConfigError(f"extra_data: {entry!r} is not FORMAT:PATH[@LIMIT]")
    if at and not (limit.isdigit() and int(limit) >= 1):
        raise ConfigError(f"extra_data: {entry!r}: the row limit after @ must be a positive integer")
    return data_format, path, int(limit) if at else None


def field_help(cls: type) -> list[tuple[str, str, Any]]:
    """(name, help, default) per field, for ``--help``."""
    rows = []
    for item in dataclasses.fields(cls):
        missing = item.default is dataclasses.MISSING
        default = item.default_factory() if missing else item.default  # type: ignore[misc]
        rows.append((item.name, item.metadata.get("help", ""), default))
    return rows


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """A YAML/``--set`` value as the field's type (ints to floats, "true" to bool, ...), or ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(arg for arg in args if arg is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_coerce(name, args[0] if args else str, item) for item in items]
    if hint is bool and isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads "2e-5" (no dot) as text
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def resolve_path(value: str, config_dir: Path | None) -> str:
    """First existing of cwd / config dir / project root joined with ``value``; else ``value`` unchanged."""
    if not value or Path(value).is_absolute() or value in TINY_MODELS or default_precision(value):
        return value
    for base in (Path.cwd(), config_dir, PROJECT_ROOT):
        if base is not None and (base / value).exists():
            return str((base / value).resolve())
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (values read as YAML scalars)."""
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                **values: Any) -> C:
    """``cls`` from a YAML file, then ``--set`` overrides, then ``values`` (CLI flags); paths resolved."""
    raw: dict[str, Any] = {}
    config_dir = None
    if path is not None:
        config_dir = Path(path).resolve().parent
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        raw.update(loaded)
    raw.update(parse_overrides(overrides or []))
    raw.update({key: value for key, value in values.items() if value is not None})
    hints = typing.get_type_hints(cls)
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(known))}"
        )
    typed = {key: _coerce(key, hints[key], value) for key, value in raw.items()}
    for key in cls.PATH_FIELDS:
        if isinstance(typed.get(key), str):
            typed[key] = resolve_path(typed[key], config_dir)
    if "extra_data" in typed:  # FORMAT:PATH[@LIMIT]: resolve the path part like `data`
        resolved = []
        for entry in typed["extra_data"]:
            data_format, path, limit = parse_source(entry)
            resolved.append(f"{data_format}:{resolve_path(path, config_dir)}" + (f"@{limit}" if limit else ""))
        typed["extra_data"] = resolved
    return cls(**typed)
