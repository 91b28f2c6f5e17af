"""The load generator against a real server: both arrival modes, two variants interleaved, bounded runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from steerserve.clients.loadgen.arrivals import arrival_times
from steerserve.clients.loadgen.cli import build_plan, main, parse_targets, require_loopback, sweep_settings
from steerserve.clients.loadgen.stats import parse_slo, percentile

VARIANTS = ["--model", "tiny:bf16", "--model", "tiny-raw:bf16"]


def _check_run(output: Path, expected_per_variant: int) -> dict:
    result = json.loads((output / "load.json").read_text())
    variants = result["summary"]["variants"]
    assert set(variants) == {"tiny:bf16", "tiny-raw:bf16"}
    for stats in variants.values():
        assert stats["failures"] == 0 and stats["successes"] == expected_per_variant
        assert stats["output_token_throughput"] > 0 and stats["request_throughput"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            d = stats[key]
            assert d["p50"] <= d["p90"] <= d["p99"], (key, d)
        assert stats["ttft_ms"]["p50"] <= stats["e2e_ms"]["p50"]
    order = [r["variant"] for r in result["requests"]]
    assert order[:4] == ["tiny:bf16", "tiny-raw:bf16", "tiny-raw:bf16", "tiny:bf16"]  # interleaved, rotating
    assert "| variant |" in (output / "load.md").read_text()
    return result


def test_concurrency_mode_with_sweep(tiny_server, tmp_path: Path) -> None:
    code = main(["--url", tiny_server.url, *VARIANTS, "--prompts", "random:12", "--num-prompts", "6",
                 "--max-tokens", "6", "--ignore-eos", "--concurrency", "3", "--sweep", "verbosity=0,4",
                 "--slo", "ttft=60000,tpot=60000", "--max-duration", "60", "--output", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    result = _check_run(tmp_path, 6)
    stats = result["summary"]["variants"]["tiny:bf16"]
    assert stats["goodput"] == pytest.approx(stats["request_throughput"])  # generous SLOs: everything counts
    assert set(stats["by_attributes"]) == {"verbosity=0", "verbosity=4"}
    assert all(r["output_tokens"] == 6 for r in result["requests"])


def test_poisson_mode_from_prompt_file(tiny_server, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"Tell me about topic {i}."]}) + "\n" for i in range(3)))
    code = main(["--url", tiny_server.url, *VARIANTS, "--prompts", str(prompts), "--num-prompts", "5",
                 "--max-tokens", "5", "--request-rate", "20", "--burstiness", "0.5", "--attributes", "complexity=1",
                 "--max-duration", "60", "--output", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    result = _check_run(tmp_path / "out", 5)
    assert all(r["attributes"] == {"complexity": 1} for r in result["requests"])
    assert result["summary"]["variants"]["tiny:bf16"]["goodput"] is None  # no SLO given


def test_time_bound_stops_sending(tiny_server, tmp_path: Path) -> None:
    code = main(["--url", tiny_server.url, "--model", "tiny:bf16", "--prompts", "random:8", "--num-prompts", "50",
                 "--max-tokens", "4", "--request-rate", "2", "--max-duration", "1.5", "--output", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    sent = json.loads((tmp_path / "load.json").read_text())["summary"]["variants"]["tiny:bf16"]["requests"]
    assert 1 <= sent < 50


def test_pure_helpers() -> None:
    times = arrival_times(2000, request_rate=10, burstiness=1, seed=1)
    assert times == sorted(times) and times == arrival_times(2000, 10, 1, seed=1)
    assert 1 / 12 < times[-1] / 1999 < 1 / 8
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    assert parse_slo("ttft=500,tpot=50") == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError):
        parse_slo("latency=5")
    with pytest.raises(ValueError):
        require_loopback("http://10.0.0.1:8000")
    assert require_loopback("http://localhost:8000/v1") == "http://localhost:8000"
    settings = sweep_settings({"humor": 1}, ["verbosity=0,4", "complexity=1,2"])
    assert len(settings) == 4 and settings[0] == {"humor": 1, "verbosity": 0, "complexity": 1}
    targets = parse_targets(["a", "b@http://127.0.0.1:9"], "http://127.0.0.1:8")
    plan = build_plan(targets, ["p0", "p1"], [None], 4, False)
    assert [(r.target.model, r.prompt) for r in plan] == [("a", "p0"), ("b", "p0"), ("b", "p1"), ("a", "p1")]
