"""``manifest.json``: what a run was made from and what it measured.

The server reads ``steering`` (``steerlm`` / ``chat-template`` / ``instructions`` / ``described``)
and ``servable``; people read the rest to know exactly which base model, data
files (with hashes), hyper-parameters, commit and hardware produced a checkpoint::

    manifest = build_manifest("dpo", config, base_model="tiny", data=data_entry(config.data, report), ...)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from steerserve.training.config import PROJECT_ROOT, CommonConfig
from steerserve.training.data.io import LoadReport, data_files, file_sha256, is_local

REQUIRED_KEYS = ("base_model", "recipe", "data", "metrics", "hyperparameters", "steps", "git_commit",
                 "steering", "servable")
STEERING_VALUES = ("steerlm", "chat-template", "instructions", "described")


def git_commit() -> str | None:
    """The project's HEAD commit (with ``-dirty`` when the tree has changes), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def data_entry(source: str, report: LoadReport | None = None, data_format: str = "") -> dict[str, Any]:
    """The data a run read: each file with its sha256 (or the hub name), and the loader's counts."""
    if is_local(source):
        files = [{"path": str(path), "sha256": file_sha256(path)} for path in data_files(source)]
    else:
        files = [{"hub": source}]
    entry: dict[str, Any] = {"source": source, "format": data_format, "files": files}
    if report is not None:
        entry.update(rows_used=report.used, rows_skipped=dict(report.skipped))
    return entry


def _versions() -> dict[str, str]:
    found = {}
    for name in ("steerserve", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """Where a training or quantize run ran. Its times (``train_runtime_s``, ``quantize_seconds``) mean nothing
    without it: one DPO epoch of the default model is 4 minutes on a GPU and 6.5 hours on 2 CPU cores."""
    import torch

    from steerserve.precision import cpu_has_native_bf16
    from steerserve.training.distributed import trains_on_cpu, world_size

    if not trains_on_cpu():
        return {"device": "cuda", "name": torch.cuda.get_device_name(), "processes": world_size()}
    return {"device": "cpu", "name": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "native_bf16": cpu_has_native_bf16(), "processes": world_size()}


def build_manifest(
    recipe: str,
    config: CommonConfig,
    *,
    base_model: str,
    data: list[dict[str, Any]],
    metrics: dict[str, Any],
    steps: int,
    steering: str | None,
    servable: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The manifest dict (REQUIRED_KEYS and then ``extra``: split sizes, resume info, ...)."""
    if servable and steering not in STEERING_VALUES:
        raise ValueError(f"a servable model needs steering in {STEERING_VALUES}, got {steering!r}")
    return {
        "recipe": recipe,
        "base_model": base_model,
        "data": data,
        "metrics": metrics,
        "hyperparameters": config.to_dict(),
        "steps": steps,
        "git_commit": git_commit(),
        "steering": steering,
        "servable": servable,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "hardware": hardware(),
        **extra,
    }


def is_complete(manifest: dict[str, Any]) -> list[str]:
    """The required keys a manifest lacks (empty when complete)."""
    return [key for key in REQUIRED_KEYS if key not in manifest]


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a finished output directory."""
    return json.loads((Path(directory) / "manifest.json").read_text())
