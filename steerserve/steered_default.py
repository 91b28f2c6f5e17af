"""The steered default model: LoRA adapters on SmolLM2-135M-Instruct, shipped in the repo.

``make steered-default`` trains them (training/recipes/*-default.yaml) and packages each
run's ``adapter/`` with its manifest into ``models/steered-default/<name>/`` (a few MB each);
``steerserve serve`` with no ``--model`` then serves the base model plus one model id per
shipped adapter, the SteerLM one under :data:`STEERED_ID`. An adapter trained on a quantized
base (QLoRA, ``lora_base_precision``) is served on the default model in that precision, so
``steered-qlora:nf4`` comes with its own ``smollm2-135m-instruct:nf4`` base: the ``default:nf4`` checkpoint it
trained on (``make`` trains it there), built into the cache on first use (see steerserve.default_model)::

    python -m steerserve.steered_default package runs/steered-default models/steered-default

``steered:<precision>`` names the shipped SteerLM adapter merged into the default model and quantized by
``steerserve quantize`` with its defaults (nf4: GPTQ rounding in act order; gptq-w4 and w4a16 pin groups of 32,
:data:`STEERED_PINNED`), built once into the cache for the
adapter as shipped (:func:`quantized_steered_dir`). That merged nf4 keeps more of the verbosity slider than the
QLoRA adapter on the column-order ``default:nf4`` (x2.13 against x1.51 on the 80 MT-Bench prompts), so it, not
the QLoRA adapter, is served as ``steered:nf4``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from steerserve.staging import staged_directory

if TYPE_CHECKING:
    from steerserve.server.settings import VariantSpec

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models" / "steered-default"
# run name -> model id it is served under
ADAPTERS = {"acsft": "steered", "acsft-nf4": "steered-qlora", "dpo-robust": "dpo-robust", "dpo-sigmoid": "dpo-sigmoid",
            "mcq": "mcq"}
STEERED_ID = "steered"
STEERED_RUN = "acsft"
"""The shipped adapter ``steered:<precision>`` merges and quantizes."""
STEERED_BUILD_DIR = "steered"
"""Where the ``steered:<precision>`` builds live in the cache, one folder per shipped adapter content."""
STEERED_PINNED: dict[str, tuple[str, ...]] = {"gptq-w4": ("--group-size", "32"), "w4a16": ("--group-size", "32")}
"""``steerserve quantize`` options a ``steered:<precision>`` build takes beyond the defaults. The 4-bit grouped formats
keep a scale per 32 input columns, not the 64 quantize picks for this model: at 64 ``steered:gptq-w4`` lost the
verbosity slider under guidance (x3.19, levels 1 and 2 alike), at 32 it keeps it (x7.32, monotone; perplexity ratio
1.142 -> 1.074 for 3.5% more bytes; benchmarks/results/guided-precisions/). Such a build lives in its own folder
(``gptq-w4-group-size-32``), so a build made before the pin is never served in its place."""
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_CHAIN = 8  # LoRA runs trained on top of each other that package stacks; more is surely a manifest loop


def _lora_base(run: Path) -> Path | None:
    """The finished LoRA run that ``run`` was trained on top of (its manifest's ``base_model``), if it is one."""
    from steerserve.training.manifest import read_manifest

    base = read_manifest(run).get("base_model")
    if base and (Path(base) / "adapter" / "adapter_config.json").is_file() and (Path(base) / "manifest.json").is_file():
        return Path(base)
    return None


def lora_chain(run: Path) -> list[Path]:
    """The adapters that serve ``run`` on the default model, in the order they apply: the adapters of the LoRA
    runs it was trained on top of (recursively), then its own."""
    chain = [run / "adapter"]
    while (base := _lora_base(chain[0].parent)) is not None:
        if len(chain) == MAX_CHAIN:
            raise ValueError(f"{run}: more than {MAX_CHAIN} LoRA runs trained on top of each other")
        chain.insert(0, base / "adapter")
    return chain


def package(runs: Path, shipped: Path = SHIPPED_DIR, adapters: Mapping[str, str] = ADAPTERS) -> list[Path]:
    """Copy each finished run's adapter + manifest into ``shipped`` (atomically per adapter). A run trained on top
    of another LoRA run's merged model ships as one adapter stacked from the chain (exact; see
    ``steerserve.training.stack_adapters``), its manifest listing the runs under it in ``stacked_on``."""
    from steerserve.training.manifest import read_manifest

    written = []
    for run_name in adapters:
        run = runs / run_name
        adapter = run / "adapter"
        if not (run / "manifest.json").is_file() or not (adapter / "adapter_config.json").is_file():
            print(f"skip {run_name}: no finished LoRA run at {run}", file=sys.stderr)
            continue
        manifest = read_manifest(run)
        chain = lora_chain(run)
        target = shipped / run_name
        with staged_directory(target) as work:
            if len(chain) > 1:
                from steerserve.training.stack_adapters import write_stacked

                write_stacked(chain, work, tokenizer=False)
                manifest["stacked_on"] = [read_manifest(adapter.parent) for adapter in chain[:-1]]
            else:
                for name in ADAPTER_FILES:
                    shutil.copy2(adapter / name, work / name)
            manifest["name"] = adapters[run_name]
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        written.append(target)
        print(f"{target}: {sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB")
    return written


def shipped_adapters(shipped: Path = SHIPPED_DIR) -> dict[str, Path]:
    """Run name -> adapter directory for every packaged adapter present."""
    return {run_name: shipped / run_name for run_name in ADAPTERS
            if (shipped / run_name / "adapter_config.json").is_file()}


def trained_precision(adapter: Path) -> str:
    """The base precision a shipped adapter was trained on: QLoRA's quantized base, else bf16."""
    from steerserve.precision import Precision, lora_base_precision

    manifest = json.loads((adapter / "manifest.json").read_text()) if (adapter / "manifest.json").is_file() else {}
    return (lora_base_precision(manifest) or Precision.BF16).value


def base_spec(adapter: Path) -> VariantSpec:
    """The variant a shipped adapter is served on: the default model as the adapter trained on it. A QLoRA
    adapter trained on ``default:nf4`` (manifest ``base_model`` ``smollm2-135m-instruct:nf4``) gets that built
    checkpoint, whose codes it learned around; one trained on ``default`` quantized at load gets the same."""
    from steerserve.default_model import DEFAULT_MODEL, DEFAULT_MODEL_NAME
    from steerserve.precision import Precision
    from steerserve.server.settings import VariantSpec

    precision = trained_precision(adapter)
    if precision == Precision.BF16.value:
        return VariantSpec(path=DEFAULT_MODEL)
    manifest = json.loads((adapter / "manifest.json").read_text())
    if manifest.get("base_model") == f"{DEFAULT_MODEL_NAME}:{precision}":
        return VariantSpec(path=f"{DEFAULT_MODEL}:{precision}")
    return VariantSpec(path=DEFAULT_MODEL, precision=precision)


def steered_precision(text: str) -> str | None:
    """``"nf4"`` for ``steered:nf4``; None when ``text`` names no ``steered:<precision>`` build. Plain ``steered``
    is no build: the bf16 steered model is the shipped adapter itself, served on the default model."""
    name, sep, precision = text.partition(":")
    return precision if name == STEERED_ID and sep and precision else None


def _adapter_digest(adapter: Path) -> str:
    """A key for the adapter's content: a checkout, a copy or a touched file of the same adapter build once."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode() + b"\0" + (adapter / name).read_bytes())
    return digest.hexdigest()[:16]


def quantized_steered_path(cache_dir: Path, precision: str, shipped: Path | None = None) -> Path:
    """Where ``steered:<precision>`` of the adapter shipped in ``shipped`` is (or will be) built; a finished build
    has its manifest.json. Another adapter (a retrained one) builds elsewhere: a build never outlives its source."""
    adapter = (shipped or SHIPPED_DIR) / STEERED_RUN
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{STEERED_ID}:{precision}: no shipped SteerLM adapter at {adapter} "
                                "(make steered-default packages it)")
    folder = "-".join([precision, *(option.lstrip("-") for option in STEERED_PINNED.get(precision, ()))])
    return Path(cache_dir).expanduser() / STEERED_BUILD_DIR / _adapter_digest(adapter) / folder


def quantized_steered_dir(cache_dir: Path, precision: str, shipped: Path | None = None) -> Path:
    """The shipped SteerLM adapter merged into the default model and quantized by ``steerserve quantize`` with its
    defaults (and :data:`STEERED_PINNED`), quantizing on first use (nf4: about 4.5 minutes on 2 cores, calibrated
    on oasst1 in ``../shared/data``), then instant. Its manifest names it ``steered``, so it is served as
    ``steered:<precision>``."""
    from steerserve.default_model import checked_precision, quantize_once
    from steerserve.precision import Precision

    if precision == Precision.BF16.value:
        raise ValueError(f"{STEERED_ID}:bf16 is the shipped adapter on the default model, served as is: "
                         f"--model {SHIPPED_DIR / STEERED_RUN},base=smollm2-135m-instruct:bf16")
    checked_precision(STEERED_ID, precision, tuple(p.value for p in Precision if p != Precision.BF16))
    output = quantized_steered_path(cache_dir, precision, shipped)
    return quantize_once(str((shipped or SHIPPED_DIR) / STEERED_RUN), precision, output, cache_dir,
                         *STEERED_PINNED.get(precision, ()))


def resolve_steered(text: str, cache_dir: Path) -> Path | None:
    """The checkpoint ``steered:<precision>`` names, built on first use; None for any other text."""
    precision = steered_precision(text)
    return None if precision is None else quantized_steered_dir(cache_dir, precision)


def built_steered_specs(shipped: Path, cache: Path) -> list[VariantSpec]:
    """A variant for every ``steered:<precision>`` of the shipped adapter already built in ``cache``."""
    from steerserve.default_model import build_state
    from steerserve.precision import Precision
    from steerserve.server.settings import VariantSpec

    if not (shipped / STEERED_RUN / "adapter_config.json").is_file():
        return []
    builds = {p: quantized_steered_path(cache, p.value, shipped) for p in Precision if p != Precision.BF16}
    states = {precision: build_state(build) for precision, build in builds.items()}
    if states[Precision.NF4] == "missing":
        logger.warning("%s:nf4 not served: not built yet (once, ~4.5 min on 2 cores): steerserve serve --model "
                       "%s:nf4", STEERED_ID, STEERED_ID)
    served = []
    for precision, build in builds.items():
        if states[precision] == "current":
            served.append(VariantSpec(path=str(build)))
        elif states[precision] == "outdated":
            logger.warning("%s:%s not served: built before quantize's %s method changed; steerserve serve --model "
                           "%s:%s rebuilds it", STEERED_ID, precision.value, precision.value, STEERED_ID,
                           precision.value)
    return served


def default_model_specs(shipped: Path = SHIPPED_DIR, cache_dir: Path | None = None) -> list[VariantSpec]:
    """What ``steerserve serve`` serves with no ``--model``: the default model and its shipped adapters, each on
    the default model in the precision it was trained on (bf16, the converted checkpoint's, unless QLoRA), and
    every ``steered:<precision>`` already built in ``cache_dir``.

    An adapter whose base is a ``default:<precision>`` build is served only once that build is in ``cache_dir``
    (the server's cache; training on it or ``--model default:nf4`` builds it), and so is ``steered:nf4``
    (``--model steered:nf4`` builds it): quantizing costs minutes and needs the calibration data, which a first
    ``steerserve serve`` should not wait for. The log says how.
    """
    from steerserve.default_model import (
        CACHE_DIR, DEFAULT_MODEL, DEFAULT_MODEL_NAME, build_state, default_precision, quantized_default_path,
    )
    from steerserve.server.settings import VariantSpec

    cache = Path(cache_dir if cache_dir is not None else CACHE_DIR).expanduser()
    bases, served = [VariantSpec(path=DEFAULT_MODEL)], []
    for adapter in shipped_adapters(shipped).values():
        spec = base_spec(adapter)
        built = default_precision(spec.path)  # bf16 unless the base is a default:<precision> build
        base_id = f"{DEFAULT_MODEL_NAME}:{spec.precision or built}"
        state = "current" if built == "bf16" else build_state(quantized_default_path(cache, built))
        if state != "current":
            why = {"outdated": "was built before quantize's method changed",
                   "missing": "is not built yet (once, ~2.5 min on 2 cores)"}[state]
            logger.warning("%s not served: its base %s %s: steerserve serve --model %s --model %s,base=%s",
                           adapter, spec.path, why, spec.path, adapter, base_id)
            continue
        if spec not in bases:
            bases.append(spec)
        served.append(VariantSpec(path=str(adapter), base=base_id))
    return [*bases, *built_steered_specs(shipped, cache), *served]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "pinned":  # for make: the quantize options a steered build adds
        print(" ".join(STEERED_PINNED.get(sys.argv[2], ())))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "current":  # for make: keep a build only if quantize makes it so now
        from steerserve.default_model import build_state

        sys.exit(0 if build_state(Path(sys.argv[2])) == "current" else 1)
    if len(sys.argv) != 4 or sys.argv[1] != "package":
        sys.exit("usage: python -m steerserve.steered_default package RUNS_DIR SHIPPED_DIR | pinned PRECISION | "
                 "current BUILD_DIR")
    sys.exit(0 if package(Path(sys.argv[2]), Path(sys.argv[3])) else 1)
