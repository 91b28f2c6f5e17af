"""Write a load run as JSON (config, summary, every request) and a markdown table.

    paths = write_report(Path("results/load"), config, summary, records)   # load.json, load.md

``markdown_table`` is the one table formatter; the benchmarks use it too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerserve.clients.loadgen.runner import RequestRecord

LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))


def fmt(value: Any, digits: int = 1) -> str:
    """Numbers rounded for tables; NaN/None as an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(cell, digits) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def load_markdown(config: dict[str, Any], summary: dict[str, Any]) -> str:
    """Throughput/goodput table, then latency percentiles per variant (ms)."""
    variants = summary["variants"]
    slo = ", ".join(f"{k}≤{v:g} ms" for k, v in summary["slo_ms"].items()) or "none"
    head = (f"Load run: {config.get('mode', '')}, {summary['duration_s']:.1f} s, prompts {config.get('prompts', '')}, "
            f"max_tokens {config.get('max_tokens', '')}, SLO {slo}\n\n")
    throughput = markdown_table(
        ["variant", "ok", "failed", "req/s", "output tok/s", "total tok/s", "mean out tokens", "goodput req/s"],
        [[name, v["successes"], v["failures"], v["request_throughput"], v["output_token_throughput"],
          v["total_token_throughput"], v["mean_output_tokens"], v["goodput"]] for name, v in variants.items()],
        digits=2,
    )
    latency = markdown_table(
        ["variant", "metric (ms)", "mean", "p50", "p90", "p99"],
        [[name, label, *(v[key][s] for s in ("mean", "p50", "p90", "p99"))]
         for name, v in variants.items() for label, key in LATENCIES],
    )
    return head + throughput + "\n" + latency


def write_report(output: Path, config: dict[str, Any], summary: dict[str, Any], records: list[RequestRecord],
                 stem: str = "load") -> dict[str, Path]:
    """``STEM.json`` and ``STEM.md`` under ``output``; returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / f"{stem}.json", "markdown": output / f"{stem}.md"}
    payload = {"config": config, "summary": summary, "requests": [dataclasses.asdict(r) for r in records]}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str))
    paths["markdown"].write_text(load_markdown(config, summary))
    return paths
