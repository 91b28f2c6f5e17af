"""The machine-level benchmarks (memory bandwidth, compute dtype per checkpoint) on the tiny model, small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_bandwidth_sets_each_weight_format_a_ceiling(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from steerserve.benchmarks.bandwidth import main

    fake_gguf = tmp_path / "gguf-q4_k_m" / "model.gguf"  # only its size is read
    fake_gguf.parent.mkdir()
    fake_gguf.write_bytes(b"\0" * 100_000)
    out = tmp_path / "bw"
    assert main(["--buffer-gib", "0.02", "--passes", "2", "--checkpoint", str(tiny_model_dir),
                 "--gguf", str(fake_gguf), "--output", str(out)]) == 0
    result = json.loads((out / "bandwidth.json").read_text())
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as weights:
        parameters = sum(weights.get_tensor(name).numel() for name in weights.keys())
    assert result["weight_bytes"] == {"float32": 4 * parameters, "bf16": 2 * parameters, "gguf-q4_k_m": 100_000}
    bandwidth = result["read"]["best_gb_s"] * 1e9
    assert bandwidth > 1e8 and result["read"]["median_gb_s"] <= result["read"]["best_gb_s"]
    for name, size in result["weight_bytes"].items():
        assert result["single_stream_ceiling_tok_s"][name] == pytest.approx(bandwidth / size)
    assert "| gguf-q4_k_m |" in (out / "bandwidth.md").read_text()


def test_compute_dtype_times_each_checkpoint_in_both_dtypes(tiny_model_dir: Path, tmp_path: Path) -> None:
    from steerserve.benchmarks.compute_dtype import main

    out = tmp_path / "cd"
    assert main([str(tiny_model_dir), "--prompt-tokens", "32", "--new-tokens", "4", "--output", str(out)]) == 0
    rows = json.loads((out / "compute_dtype.json").read_text())["rows"]
    assert [(r["compute_dtype"], r["precision"]) for r in rows] == [("bfloat16", "bf16"), ("float32", "bf16")]
    assert all(r["prefill_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    table = (out / "compute_dtype.md").read_text()
    assert table.count("| bfloat16 |") == 1 and table.count("| float32 |") == 1
