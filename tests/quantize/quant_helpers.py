"""Helpers of the quantization tests: run the real command with cheap evaluation settings."""

from __future__ import annotations

from pathlib import Path

from steerserve.training.quantize.cli import main as quantize_main

# Small held-out sets: the numbers are real, just cheap (a tiny random model scores ~chance anyway).
QUICK = ["--eval-chars", "800", "--mcq-per-subject", "1", "--mcq-items", "6", "--calibration-samples", "8",
         "--calibration-max-tokens", "128"]


def quantize(source: Path, precision: str, output: Path, *extra: str) -> int:
    """``steerserve quantize SOURCE --precision P --output OUT`` with the quick evaluation settings."""
    return quantize_main([str(source), "--precision", precision, "--output", str(output), *QUICK, *extra])

