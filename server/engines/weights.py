"""Bytes a checkpoint's weights take once an engine has loaded them, from safetensors headers only.

The vLLM engine's weights live in its worker process, which cannot be introspected
cheaply; the headers give every tensor's dtype and shape without reading data::

    checkpoint_weight_bytes(Path("/ckpt"), "bfloat16")              # 16-bit as served
    checkpoint_weight_bytes(Path("/ckpt"), "bfloat16", fp8=True)    # vLLM's online fp8
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def checkpoint_weight_bytes(model_dir: Path, dtype: str, *, fp8: bool = False) -> int:
    """Bytes the checkpoint's tensors take once loaded: float tensors cast to ``dtype``.

    Integer tensors (packed quantized weights) keep their stored size. Tied embeddings are
    stored (and loaded) once. With ``fp8`` the linear layers' 2-D weights (``*proj.weight``)
    count one byte per element: vLLM's online fp8 quantizes those and keeps the rest 16-bit.
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        logger.warning("no safetensors files in %s; weight_bytes reports 0", model_dir)
        return 0
    float_bytes = _DTYPE_BYTES.get(dtype)
    total = 0
    for path in files:
        for name, info in _safetensors_header(path).items():
            stored = info["data_offsets"][1] - info["data_offsets"][0]
            itemsize = _FLOAT_BYTES.get(info["dtype"])
            if itemsize is None or float_bytes is None:
                total += stored
            elif fp8 and len(info["shape"]) == 2 and name.endswith("proj.weight"):
                total += stored // itemsize
            else:
                total += stored // itemsize * float_bytes
    return total


def _safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a safetensors file's header."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header
