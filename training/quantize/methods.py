"""What every quantization method shares: the job, its result, and the precision -> method table.

    quantizer = load_quantizer(Precision.NF4)       # imports steerserve.training.quantize.bnb only now
    result = quantizer(job, work_dir)               # writes the variant's files into work_dir

A method that cannot run here raises :class:`Unavailable` with a one-line reason
(the CLI prints it and exits non-zero; tests skip with it).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from steerserve.precision import Precision

# precision -> "module:function"; a module is imported only when its precision is asked for.
QUANTIZERS: dict[Precision, str] = {
    Precision.FP32: "steerserve.training.quantize.cast:quantize",
    Precision.BF16: "steerserve.training.quantize.cast:quantize",
    Precision.FP16: "steerserve.training.quantize.cast:quantize",
    Precision.INT8: "steerserve.training.quantize.bnb:quantize",
    Precision.NF4: "steerserve.training.quantize.bnb:quantize",
    Precision.GPTQ_W4: "steerserve.training.quantize.gptq:quantize",
    Precision.GPTQ_W8: "steerserve.training.quantize.gptq:quantize",
    Precision.W4A16: "steerserve.training.quantize.compressed:quantize",
    Precision.W8A8: "steerserve.training.quantize.compressed:quantize",
    Precision.GGUF_Q8_0: "steerserve.training.quantize.gguf:quantize",
    Precision.GGUF_Q4_K_M: "steerserve.training.quantize.gguf:quantize",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


class Rounding(str, enum.Enum):
    """How nf4 chooses each weight's 4-bit code (``--rounding``; nf4_rounding says why GPTQ)."""

    GPTQ_ACT_ORDER = "gptq-act-order"
    """Error feedback on the calibration set, the columns with the largest inputs first (the default)."""
    GPTQ = "gptq"
    """The same in column order (what ``default:nf4`` and its QLoRA adapter keep)."""
    NEAREST = "nearest"
    """bitsandbytes' own: each weight to its nearest code, no calibration."""

    @property
    def uses_gptq(self) -> bool:
        return self is not Rounding.NEAREST

    @property
    def act_order(self) -> bool:
        return self is Rounding.GPTQ_ACT_ORDER


class Scales(str, enum.Enum):
    """How w4a16 sets each group's scale (``--scales``)."""

    MSE = "mse"
    """Searched: the clipping of the group's range whose rounding leaves the least squared error (the default).
    On the steered default it cuts the perplexity lost to 4 bits from 29% to 11% (groups of 32; GPTQModel's gptq-w4
    loses 11% too) and gives the verbosity slider back (benchmarks/results/guided-precisions/)."""
    MINMAX = "minmax"
    """The group's largest magnitude: nothing clipped, so every other weight of the group rounds on coarser steps."""


SETTINGS_RECORDED_SINCE: dict[Precision, str] = {Precision.W4A16: "scales"}
"""A manifest setting a build of the precision has recorded since its method last changed: a cached build without
it was made the old way (w4a16 before MSE-searched scales) and is rebuilt rather than served."""


def predates_current_method(manifest: dict[str, Any]) -> bool:
    """Whether a finished build's manifest was written before its precision's method last changed."""
    try:
        precision = Precision(manifest.get("precision"))
    except ValueError:
        return False
    setting = SETTINGS_RECORDED_SINCE.get(precision)
    return setting is not None and setting not in (manifest.get("settings") or {})


class Unavailable(RuntimeError):
    """This precision cannot be produced on this machine; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class QuantizeJob:
    """One ``steerserve quantize`` request, resolved."""

    source: Path
    """The 16-bit (or fp32) checkpoint directory every variant is made from."""
    precision: Precision
    calibration: str = "oasst1"
    """Named calibration data set (see calibration.CALIBRATION_SETS); only calibrated methods read it."""
    calibration_samples: int = 128
    calibration_max_tokens: int = 512
    seed: int = 0
    rounding: Rounding = Rounding.GPTQ_ACT_ORDER
    """nf4 only: how each weight's code is chosen."""
    low_rank_correction: int = 0
    """nf4 only: rank of the per-layer correction of the rounding error kept beside the weights (0: none)."""
    scales: Scales = Scales.MSE
    """w4a16 only: how each group's scale is set."""
    group_size: int | None = None
    """Grouped 4/8-bit GPTQ formats (gptq-w4, gptq-w8, w4a16): input columns per scale; None: the largest of
    128, 64, 32 that divides every layer's input width."""
    eval_set: dict[str, Any] | None = None
    """quality.build_eval_set output: a method that holds the quantized model anyway may score it."""


@dataclasses.dataclass
class MethodResult:
    """What a quantizer reports for the manifest, and how to measure the result's quality."""

    method: str
    """e.g. "gptq (GPTQModel)", "bitsandbytes nf4"."""
    libraries: dict[str, str]
    """Versions of the libraries that produced the files."""
    scorer: str
    """quality.SCORERS key that can run the variant: transformers, gptqmodel, vllm, llama.cpp."""
    calibration: dict[str, Any] | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    raw_quality: dict[str, Any] | None = None
    """Raw log-probs when the method scored job.eval_set itself (``scorer`` then says how)."""


Quantizer = Callable[[QuantizeJob, Path], MethodResult]


def load_quantizer(precision: Precision) -> Quantizer:
    """The quantize function for ``precision`` (its module imported now)."""
    module_name, _, function = QUANTIZERS[precision].partition(":")
    return getattr(importlib.import_module(module_name), function)


def check_available(precision: Precision) -> None:
    """Raise Unavailable now if the method's module knows it cannot run (before any work is done)."""
    if precision.served_only:
        raise Unavailable(f"{precision.value} is served only: vLLM quantizes a 16-bit checkpoint as it loads it "
                          f"on a CUDA GPU (steerserve serve --model CKPT,precision={precision.value})")
    module_name = QUANTIZERS[precision].partition(":")[0]
    check = getattr(importlib.import_module(module_name), "check", None)
    if check is not None:
        check(precision)


def versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones left out)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def require(module: str, hint: str) -> None:
    """Raise Unavailable (one line, with the install hint) when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"{module} is not installed here; {hint}")


def copy_tokenizer(source: Path, work: Path) -> None:
    """The source's tokenizer files (and generation config) next to the new weights."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (work / name).exists():
            shutil.copy2(source / name, work / name)


BOOKKEEPING = frozenset({"manifest.json", "run.json"})


def dir_bytes(path: Path) -> int:
    """Bytes on disk of the variant's files under ``path`` (the manifest's ``bytes``)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name not in BOOKKEEPING)
