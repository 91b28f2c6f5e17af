"""The steered default model: LoRA adapters on SmolLM2-135M-Instruct, shipped in the repo.

``make steered-default`` trains them (training/recipes/*-default.yaml) and packages each
run's ``adapter/`` with its manifest into ``models/steered-default/<name>/`` (a few MB each);
``steerserve serve`` with no ``--model`` then serves the base model plus one model id per
shipped adapter, the SteerLM one under :data:`STEERED_ID`. An adapter trained on a quantized
base (QLoRA, ``lora_base_precision``) is served on the default model in that precision, so
``steered:nf4`` comes with its own ``smollm2-135m-instruct:nf4`` base: the ``default:nf4`` checkpoint it trained
on (``make`` trains it there), built into the cache on first use (see steerserve.default_model)::

    python -m steerserve.steered_default package runs/steered-default models/steered-default
"""

from __future__ import annotations

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
ADAPTERS = {"acsft": "steered", "acsft-nf4": "steered", "dpo-robust": "dpo-robust", "dpo-sigmoid": "dpo-sigmoid",
            "mcq": "mcq"}
STEERED_ID = "steered"
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


def default_model_specs(shipped: Path = SHIPPED_DIR, cache_dir: Path | None = None) -> list[VariantSpec]:
    """What ``steerserve serve`` serves with no ``--model``: the default model and its shipped adapters, each on
    the default model in the precision it was trained on (bf16, the converted checkpoint's, unless QLoRA).

    An adapter whose base is a ``default:<precision>`` build is served only once that build is in ``cache_dir``
    (the server's cache; training on it or ``--model default:nf4`` builds it): quantizing it costs minutes and
    needs the calibration data, which a first ``steerserve serve`` should not wait for. The log says how.
    """
    from steerserve.default_model import (
        CACHE_DIR, DEFAULT_MODEL, DEFAULT_MODEL_NAME, default_precision, quantized_default_path,
    )
    from steerserve.server.settings import VariantSpec

    cache = Path(cache_dir if cache_dir is not None else CACHE_DIR).expanduser()
    bases, served = [VariantSpec(path=DEFAULT_MODEL)], []
    for adapter in shipped_adapters(shipped).values():
        spec = base_spec(adapter)
        built = default_precision(spec.path)  # bf16 unless the base is a default:<precision> build
        base_id = f"{DEFAULT_MODEL_NAME}:{spec.precision or built}"
        if built != "bf16" and not (quantized_default_path(cache, built) / "manifest.json").is_file():
            logger.warning("%s not served: its base %s is not built yet (once, ~2.5 min on 2 cores): "
                           "steerserve serve --model %s --model %s,base=%s", adapter, spec.path, spec.path,
                           adapter, base_id)
            continue
        if spec not in bases:
            bases.append(spec)
        served.append(VariantSpec(path=str(adapter), base=base_id))
    return [*bases, *served]


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "package":
        sys.exit("usage: python -m steerserve.steered_default package RUNS_DIR SHIPPED_DIR")
    sys.exit(0 if package(Path(sys.argv[2]), Path(sys.argv[3])) else 1)
