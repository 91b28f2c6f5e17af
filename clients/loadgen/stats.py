"""Per-variant statistics of a load run: throughput, latency percentiles, goodput under SLOs.

    summary = summarize(records, wall_s, slo=parse_slo("ttft=500,tpot=50"))
    summary["variants"]["a:bf16"]["ttft_ms"]["p99"]

Latencies are reported in milliseconds like ``vllm bench serve``: TTFT, TPOT
(per request: decode time / (tokens - 1)), ITL (every gap between streamed
chunks) and end-to-end. Goodput counts only requests that met every SLO.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from steerserve.clients.loadgen.runner import RequestRecord

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2e")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), so p50 <= p90 <= p99 always holds."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values_s: Iterable[float | None]) -> dict[str, float]:
    """Mean, p50, p90, p99 in milliseconds of the values that exist."""
    values = [v * 1000 for v in values_s if v is not None]
    stats = {"mean": sum(values) / len(values) if values else math.nan}
    stats.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return stats


def parse_slo(text: str | None) -> dict[str, float]:
    """``ttft=500,tpot=50,e2e=4000`` (milliseconds) -> ``{"ttft": 500.0, ...}``."""
    slo: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--slo item {item!r}: expected NAME=MS with NAME one of {', '.join(SLO_METRICS)}")
        slo[name] = float(value)
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """A successful request within every SLO (a missing TPOT - one token - cannot break its SLO)."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2e": record.e2e}
    return all(values[name] is None or values[name] * 1000 <= limit for name, limit in slo.items())


def _variant_summary(records: list[RequestRecord], wall: float, slo: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in records if r.success]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    errors: dict[str, int] = defaultdict(int)
    for record in records:
        if not record.success:
            errors[(record.error or "unknown")[:120]] += 1
    return {
        "requests": len(records),
        "successes": len(ok),
        "failures": len(records) - len(ok),
        "errors": dict(errors),
        "request_throughput": len(ok) / wall,
        "output_token_throughput": output / wall,
        "total_token_throughput": (prompt + output) / wall,
        "mean_output_tokens": output / len(ok) if ok else math.nan,
        "mean_output_chars": sum(r.output_chars for r in ok) / len(ok) if ok else math.nan,
        "ttft_ms": distribution(r.ttft for r in ok),
        "tpot_ms": distribution(r.tpot for r in ok),
        "itl_ms": distribution(gap for r in ok for gap in r.itl),
        "e2e_ms": distribution(r.e2e for r in ok),
        "goodput": sum(meets_slo(r, slo) for r in records) / wall if slo else None,
        "by_attributes": _by_attributes(ok),
    }


def _by_attributes(records: list[RequestRecord]) -> dict[str, dict[str, float]]:
    """Mean output length per attribute setting: what a swept slider did to the answers."""
    groups: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        key = ",".join(f"{k}={v}" for k, v in sorted((record.attributes or {}).items())) or "defaults"
        groups[key].append(record)
    return {key: {"requests": len(group), "mean_output_tokens": sum(r.output_tokens for r in group) / len(group),
                  "mean_output_chars": sum(r.output_chars for r in group) / len(group)}
            for key, group in sorted(groups.items())}


def summarize(records: list[RequestRecord], wall: float, slo: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-variant statistics over one interleaved run; every variant shares the run's wall time."""
    slo = slo or {}
    by_variant: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        by_variant[record.variant].append(record)
    wall = max(wall, 1e-9)
    return {"duration_s": wall, "slo_ms": slo,
            "variants": {name: _variant_summary(group, wall, slo) for name, group in by_variant.items()}}
