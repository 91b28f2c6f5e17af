"""``steerserve bench``: run benchmarks against served variants; JSON, markdown and a PNG per benchmark.

    steerserve bench all --quick --output results/bench            # the default model's variants, < 2 min each
    steerserve bench steerability --url http://127.0.0.1:8000 --model steer:bf16

Without ``--url`` each ``--variant`` spec (default: the default model on vLLM
and on transformers) is started as its own ``steerserve serve`` process, once
for all selected benchmarks, then stopped; references run after the last server.
A ``SUMMARY.md`` gathers every table of the run. Steerability and MCQ keep each finished variant under
``OUTPUT/.partial/``, steerability each answer too: the same command run again after an interruption measures
only the rest. ``--rescore RESULT...`` measures finished steerability results' stored answers again (joined into
one table when several; benchmarks.rescore).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from steerserve.benchmarks.no_collapse import apm_problem

logger = logging.getLogger(__name__)
BENCHMARKS = ("latency_memory", "steerability", "mcq")


def _modules() -> dict[str, ModuleType]:
    from steerserve.benchmarks import latency_memory, mcq_accuracy, steerability

    return {m.NAME: m for m in (latency_memory, steerability, mcq_accuracy)}


def _parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve bench", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark (all: every one)")
    parser.add_argument("--quick", action="store_true", help="small sizes for CI smoke tests (< 2 min each)")
    parser.add_argument("--output", type=Path, default=Path("results/bench"), help="results folder")
    parser.add_argument("--url", help="measure this running server (loopback) instead of starting variants")
    parser.add_argument("--model", action="append", default=[], help="with --url: model ids (default: all)")
    parser.add_argument("--variant", action="append", default=[],
                        help="a 'steerserve serve --model' spec to start (repeat); default: the default model "
                             "on vllm and on transformers")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for started servers")
    parser.add_argument("--rescore", type=Path, nargs="+", metavar="RESULT.json[.gz]",
                        help="steerability only: measure finished results' stored answers again with today's "
                             "measures (no server) and write their outputs to --output; several are joined into "
                             "one table, each variant cut to the prompts all of them answered")
    for module in modules.values():
        module.add_arguments(parser)
    return parser


def run(args: argparse.Namespace, modules: dict[str, ModuleType]) -> dict[str, dict[str, Path]]:
    """Measure every target with every selected benchmark, then write each benchmark's three files."""
    from steerserve.benchmarks.partial import PartialResults
    from steerserve.benchmarks.report import environment, write_outputs
    from steerserve.benchmarks.servers import iterate_targets

    selected = list(modules) if args.name == "all" else [args.name]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
    partial = PartialResults(args.output, config)
    kept = {name: partial.load(name) if getattr(modules[name], "RESUMABLE", False) else {} for name in selected}
    results: dict[str, dict[str, Any]] = {name: {} for name in selected}
    targets = []
    start = time.perf_counter()
    for target in iterate_targets(args.url, args.model, args.variant, args.server_arg):
        targets.append(target)
        for name in selected:
            if target.label in kept[name]:
                logger.info("%s on %s: kept from an interrupted run (%s)", name, target.label, partial.folder)
                # stored by this run's earlier try, possibly by older code: a module measures it again if it can
                restore = getattr(modules[name], "remeasure", lambda result: result)
                results[name][target.label] = restore(kept[name][target.label])
                continue
            logger.info("%s on %s", name, target.label)
            log = ({"answer_log": partial.answer_log(name, target.label)}
                   if getattr(modules[name], "ANSWER_LOG", False) else {})
            results[name][target.label] = modules[name].measure(target, args, **log)
            if getattr(modules[name], "RESUMABLE", False):
                partial.save(name, {**kept[name], **results[name]})
    refs = modules["latency_memory"].references(targets, args) if "latency_memory" in selected else {}
    written = {}
    for name in selected:
        payload, markdown, fig = modules[name].finish(results[name], refs if name == "latency_memory" else {}, args)
        payload.update(config=config, environment=environment(), seconds=time.perf_counter() - start)
        written[name] = write_outputs(args.output, name, payload, f"## {name}\n\n{markdown}", fig)
        partial.clear(name)
    return written


def _rescore(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, dict[str, Path]]:
    """``--rescore``: a steerability result measured again from its answers (benchmarks.rescore)."""
    from steerserve.benchmarks.rescore import rescore

    if args.name != "steerability":
        parser.error("--rescore applies to the steerability benchmark only")
    for path in args.rescore:
        if not path.is_file():
            parser.error(f"--rescore: no such file {path}")
    try:
        return {"steerability": rescore(args.rescore, args.output, parser.parse_args(["steerability"]), args.apm)}
    except (ValueError, KeyError, json.JSONDecodeError, OSError) as error:
        parser.error(f"--rescore: {' '.join(map(str, args.rescore))}: {error}")


def main(argv: list[str]) -> int:
    modules = _modules()
    parser = _parser(modules)
    args = parser.parse_args(argv)
    if args.apm is not None and (problem := apm_problem(args.apm)):  # every benchmark's options are on one parser
        parser.error(f"--apm: {problem}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /metrics scrape otherwise
    if args.rescore is not None:
        written = _rescore(parser, args)
    else:
        written = run(args, modules)
    summary = "\n".join(paths["markdown"].read_text() for paths in written.values())
    (args.output / "SUMMARY.md").write_text(summary)
    print(summary)
    for name, paths in written.items():
        print(f"{name}: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
