"""Multiple-choice accuracy per variant on MMLU and AQuA-RAT (or any MCQ file), through ``/v1/mcq``.

    steerserve bench mcq --variant default --mcq-set mmlu=../shared/data/mmlu/test:mmlu --mcq-limit 200

A set is ``NAME=PATH[:FORMAT]`` with FORMAT one of the training loaders'
(mcq, mmlu, aqua, sciq, truthfulqa). Large sets are subsampled with a fixed
seed (MMLU's files are sorted by subject, so the first N rows would be one
subject). The answer is the server's letter-probability choice, never parsed text.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from steerserve.benchmarks.report import figure, markdown_table
from steerserve.benchmarks.servers import BenchTarget

NAME = "mcq"
RESUMABLE = True
"""Greedy answers / MCQ scores do not depend on when they ran: an interrupted run goes on (benchmarks.partial)."""
DEFAULT_SETS = ("mmlu=../shared/data/mmlu/test:mmlu", "aqua=../shared/data/aqua/dev.json:aqua")
QUICK_SETS = ("mmlu=../shared/data/mmlu/dev:mmlu", "aqua=../shared/data/aqua/dev.json:aqua")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mcq")
    group.add_argument("--mcq-set", action="append", default=[], help="NAME=PATH[:FORMAT] (repeat)")
    group.add_argument("--mcq-limit", type=int, help="questions per set (default 200; quick 10)")
    group.add_argument("--mcq-heldout", type=float, metavar="FRACTION",
                       help="score only the part an MCQ SFT run with this test_fraction (seed 0) held out of "
                            "each set, e.g. 0.2 for training/recipes/sft-mcq-default.yaml")


def parse_set(text: str) -> tuple[str, str, str]:
    """``NAME=PATH[:FORMAT]`` -> (name, path, format); the format defaults to the name if it is a known one."""
    from steerserve.clients.loadgen.prompts import shared_data
    from steerserve.training.data.mcq import FORMATS

    name, sep, rest = text.partition("=")
    if not sep:
        raise ValueError(f"--mcq-set {text!r} is not NAME=PATH[:FORMAT]")
    path, _, data_format = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in FORMATS else (rest, "", "")
    data_format = data_format or (name if name in FORMATS else "mcq")
    return name, str(shared_data(path)) if path.startswith("../shared/data") else path, data_format


def load_sets(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every set's rows (seeded subsample of ``--mcq-limit``), loaded once for all variants."""
    from steerserve.clients.mcq_cli import load_rows

    limit = args.mcq_limit or (10 if args.quick else 200)
    sets = {}
    for text in args.mcq_set or (QUICK_SETS if args.quick else DEFAULT_SETS):
        name, path, data_format = parse_set(text)
        rows = load_rows(path, data_format, None)
        if args.mcq_heldout:  # the same grouped split the training recipes make, source by source
            from steerserve.training.data.split import grouped_split, prompt_key

            rows = grouped_split(rows, prompt_key, args.mcq_heldout, 0)[1]
        if len(rows) > limit:
            rows = [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), limit))]
        sets[name] = {"path": path, "format": data_format, "rows": rows,
                      "part": f"held out ({args.mcq_heldout})" if args.mcq_heldout else "all"}
    return sets


def measure(target: BenchTarget, args: argparse.Namespace) -> dict[str, Any]:
    from steerserve.clients.client import SteerClient
    from steerserve.clients.mcq_cli import score_rows

    if not hasattr(args, "_mcq_sets"):
        args._mcq_sets = load_sets(args)
    results = {}
    with SteerClient(target.url) as client:
        for name, data in args._mcq_sets.items():
            scored = score_rows(client, target.model, data["rows"], batch_size=16)
            results[name] = {k: scored[k] for k in ("accuracy", "correct", "total", "chance", "seconds")}
            results[name]["source"] = data["path"]
            results[name]["part"] = data["part"]
    return results


def finish(results: dict[str, dict[str, Any]], refs: dict[str, Any],
           args: argparse.Namespace) -> tuple[dict[str, Any], str, Any]:
    """Accuracy table (chance beside it) and grouped bars per set."""
    names = list(next(iter(results.values()))) if results else []
    rows = [[label, *(f"{r[n]['accuracy']:.3f} ({r[n]['correct']}/{r[n]['total']})" for n in names)]
            for label, r in results.items()]
    if results:
        first = next(iter(results.values()))
        rows.append(["chance", *(f"{first[n]['chance']:.3f}" for n in names)])
    table = markdown_table(["variant", *names], rows)
    fig, axes = figure(1, width=6.5)
    ax = axes[0][0]
    width = 0.8 / max(len(results), 1)
    for k, (label, r) in enumerate(results.items()):
        ax.bar([i + k * width for i in range(len(names))], [r[n]["accuracy"] for n in names], width, label=label)
    if results:
        first = next(iter(results.values()))
        for i, n in enumerate(names):
            ax.hlines(first[n]["chance"], i - 0.1, i + 0.8, colors="k", linestyles="dashed")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_ylabel("accuracy (dashed: chance)")
    ax.legend(fontsize=7)
    sources = {n: first[n]["source"] for n in names} if results else {}
    return {"variants": results, "sources": sources}, "Letter-probability answers via /v1/mcq.\n\n" + table, fig
