"""``steerserve load``: drive one or more variants with open-loop or fixed-concurrency traffic, interleaved.

    steerserve load --url http://127.0.0.1:8000 --model a:bf16 --model b:bf16 --request-rate 2 --num-prompts 40 \\
        --sweep verbosity=0,2,4 --slo ttft=1000,tpot=100 --output results/load

Every prompt goes to every variant, adjacent in time and in rotating order, so
drift of the machine (thermal, other jobs) hits all variants alike. Only
loopback servers are accepted, and a run stops after ``--num-prompts`` per
variant or ``--max-duration`` seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from steerserve.clients.loadgen.runner import PlannedRequest, Target


def require_loopback(url: str) -> str:
    """The URL without a trailing slash or ``/v1``; refuses any host that is not this machine's loopback."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{url}: the load generator only targets loopback servers (127.0.0.0/8, ::1, localhost)")
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def parse_targets(models: list[str], default_url: str) -> list[Target]:
    """``ID`` (on ``--url``) or ``ID@URL`` (a variant on another server)."""
    targets = []
    for text in models:
        model, _, url = text.partition("@")
        targets.append(Target(model=model, url=require_loopback(url or default_url)))
    return targets


def sweep_settings(fixed: dict[str, int], sweeps: list[str]) -> list[dict[str, int] | None]:
    """Attribute settings cycled over the prompts: the product of every ``--sweep NAME=L1,L2`` over ``fixed``."""
    from steerserve.attributes import validate_attributes

    axes = []
    for text in sweeps:
        name, sep, levels = text.partition("=")
        if not sep:
            raise ValueError(f"--sweep {text!r} is not NAME=L1,L2,...")
        axes.append([(name.strip(), int(level)) for level in levels.split(",") if level.strip()])
    settings = [validate_attributes({**fixed, **dict(combo)}) for combo in itertools.product(*axes)]
    return [s or None for s in settings] or [fixed or None]


def build_plan(targets: list[Target], prompts: list[str], settings: list[dict[str, int] | None], max_tokens: int,
               ignore_eos: bool) -> list[PlannedRequest]:
    """Prompt i goes to every target in turn (order rotated by i), with setting ``i % len(settings)``."""
    plan = []
    for i, prompt in enumerate(prompts):
        rotation = targets[i % len(targets):] + targets[:i % len(targets)]
        for target in rotation:
            plan.append(PlannedRequest(len(plan), target, prompt, settings[i % len(settings)], max_tokens, ignore_eos))
    return plan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve load", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server (loopback only)")
    parser.add_argument("--model", action="append", default=[], help="variant id, or ID@URL; repeat to compare")
    parser.add_argument("--prompts", default="mt_bench", help="mt_bench, random:LEN (words) or a JSONL/CSV file")
    parser.add_argument("--num-prompts", type=int, default=50, help="prompts per variant")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="mean requests/s over all variants (Poisson); inf sends all at once")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals; 1 = Poisson")
    parser.add_argument("--concurrency", type=int, help="most requests in flight at once")
    parser.add_argument("--attributes", help="fixed sliders for every request, e.g. verbosity=1")
    parser.add_argument("--sweep", action="append", default=[], help="NAME=L1,L2,... cycled over the prompts")
    parser.add_argument("--slo", help="goodput SLOs in ms, e.g. ttft=500,tpot=50,e2e=5000")
    parser.add_argument("--max-duration", type=float, default=300.0, help="stop sending after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("results/load"))
    parser.add_argument("--api-key")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _default_model(url: str, api_key: str | None) -> str:
    from steerserve.clients.client import SteerClient

    with SteerClient(url, api_key=api_key) as client:
        return client.models().data[0].id


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Plan, send and summarize; returns (config, summary, records)."""
    from steerserve.clients.chat_cli import parse_attribute_flags
    from steerserve.clients.loadgen.arrivals import arrival_times
    from steerserve.clients.loadgen.prompts import load_prompts
    from steerserve.clients.loadgen.runner import run_load
    from steerserve.clients.loadgen.stats import parse_slo, summarize

    url = require_loopback(args.url)
    slo = parse_slo(args.slo)
    targets = parse_targets(args.model or [_default_model(url, args.api_key)], url)
    settings = sweep_settings(parse_attribute_flags(args.attributes), args.sweep)
    prompts = load_prompts(args.prompts, args.num_prompts, args.seed)
    plan = build_plan(targets, prompts, settings, args.max_tokens, args.ignore_eos)
    times = arrival_times(len(plan), args.request_rate, args.burstiness, args.seed)
    records, wall = asyncio.run(run_load(plan, times, concurrency=args.concurrency, max_duration=args.max_duration,
                                         api_key=args.api_key, progress=not args.no_progress))
    mode = (f"concurrency {args.concurrency}" if args.request_rate == float("inf")
            else f"rate {args.request_rate:g}/s burstiness {args.burstiness:g}"
            + (f", concurrency ≤{args.concurrency}" if args.concurrency else ""))
    config = {"mode": mode, "targets": [t.__dict__ for t in targets], "prompts": args.prompts,
              "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
              "request_rate": args.request_rate, "burstiness": args.burstiness, "concurrency": args.concurrency,
              "attribute_settings": settings, "max_duration": args.max_duration, "seed": args.seed}
    return config, summarize(records, wall, slo), records


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from steerserve.clients.loadgen.report import load_markdown, write_report

    config, summary, records = run(args)
    paths = write_report(args.output, config, summary, records)
    print(load_markdown(config, summary))
    print(json.dumps({key: str(path) for key, path in paths.items()}))
    failures = sum(v["failures"] for v in summary["variants"].values())
    return 0 if failures == 0 else 1
