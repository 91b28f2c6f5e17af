"""Benchmark outputs: ``NAME.json``, ``NAME.md`` and ``NAME.png`` in the results folder.

    paths = write_outputs(Path("results/bench"), "steerability", payload, markdown, figure)
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from steerserve.clients.loadgen.report import fmt, markdown_table

__all__ = ["environment", "figure", "fmt", "markdown_table", "write_outputs"]


def environment() -> dict[str, Any]:
    """What the numbers were measured on; benchmark results mean little without it."""
    import os

    import torch

    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def figure(columns: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    """A matplotlib figure (Agg backend: no display needed) and its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width * columns, height), squeeze=False)


def _json_safe(value: Any) -> Any:
    """NaN/inf become null, so the JSON is standard (browsers and jq reject NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(output: Path, name: str, payload: dict[str, Any], markdown: str, fig: Any) -> dict[str, Path]:
    """Write the three files and close the figure; returns their paths."""
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / f"{name}.json", "markdown": output / f"{name}.md", "plot": output / f"{name}.png"}
    paths["json"].write_text(json.dumps(_json_safe(payload), indent=2))
    paths["markdown"].write_text(markdown)
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=110)
    plt.close(fig)
    return paths
