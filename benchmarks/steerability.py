"""Does the slider move the answer? Verbosity 0-4 against length, complexity 0-4 against reading grade.

    steerserve bench steerability --variant default --prompts mt_bench --num-prompts 8

For each variant, every prompt is answered (greedy) at each level of one
slider while the others keep their defaults. Reported per level: mean
characters and mean Flesch-Kincaid grade (textstat); per slider: Spearman
correlation between level and measure over all answers. The HelpSteer paper's
figures are shown beside ours: chars 422 -> 1125 across verbosity, FKGL 8.49 -> 9.10
across complexity (SteerLM 43B).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from tqdm import tqdm

from steerserve.measures import chars, fk_grade, mean, spearman
from steerserve.benchmarks.report import figure, markdown_table
from steerserve.benchmarks.servers import BenchTarget

NAME = "steerability"
LEVELS = (0, 1, 2, 3, 4)
SWEEPS = {"verbosity": "chars", "complexity": "fkgl"}
PAPER = {"verbosity": {"chars": {0: 422.0, 4: 1125.0}}, "complexity": {"fkgl": {0: 8.49, 4: 9.10}}}
PAPER_SOURCE = "HelpSteer (Wang et al. 2023), SteerLM 43B on its held-out prompts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("steerability")
    group.add_argument("--prompts", default="mt_bench", help="mt_bench, or a JSONL/CSV file of prompts")
    group.add_argument("--num-prompts", type=int, help="prompts per level (default 8; quick 2)")
    group.add_argument("--answer-tokens", type=int, help="max tokens per answer (default 384; quick 24)")
    group.add_argument("--parallel", type=int, default=8, help="requests in flight at once")


async def _answers(target: BenchTarget, prompts: list[str], max_tokens: int, parallel: int) -> list[dict[str, Any]]:
    """Every (slider, level, prompt) answered; greedy so reruns agree."""
    from steerserve.clients.client import AsyncSteerClient

    jobs = [(name, level, i) for name in SWEEPS for level in LEVELS for i in range(len(prompts))]
    limit = asyncio.Semaphore(parallel)
    bar = tqdm(total=len(jobs), desc=f"steerability {target.label}", unit="answer")

    async def one(client: AsyncSteerClient, name: str, level: int, i: int) -> dict[str, Any]:
        async with limit:
            reply = await client.chat(target.model, prompts[i], attributes={name: level}, max_tokens=max_tokens,
                                      temperature=0.0)
        bar.update(1)
        text = reply.choices[0].message.content
        return {"slider": name, "level": level, "prompt": i, "chars": chars(text), "fkgl": fk_grade(text),
                "tokens": reply.usage.completion_tokens, "finish_reason": reply.choices[0].finish_reason}

    async with AsyncSteerClient(target.url) as client:
        answers = await asyncio.gather(*(one(client, *job) for job in jobs))
    bar.close()
    return answers


def summarize(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Per slider: mean chars / FKGL per level and the Spearman correlation of level with its own measure."""
    out: dict[str, Any] = {}
    for name, measure in SWEEPS.items():
        rows = [a for a in answers if a["slider"] == name]
        out[name] = {
            "measure": measure,
            "chars": {lvl: mean([a["chars"] for a in rows if a["level"] == lvl]) for lvl in LEVELS},
            "fkgl": {lvl: mean([a["fkgl"] for a in rows if a["level"] == lvl]) for lvl in LEVELS},
            "spearman": spearman([a["level"] for a in rows], [a[measure] for a in rows]),
            "truncated": sum(a["finish_reason"] == "length" for a in rows) / max(len(rows), 1),
        }
    return out


def sizes(args: argparse.Namespace) -> tuple[int, int]:
    return (args.num_prompts or (2 if args.quick else 8), args.answer_tokens or (24 if args.quick else 384))


def measure(target: BenchTarget, args: argparse.Namespace) -> dict[str, Any]:
    from steerserve.clients.loadgen.prompts import load_prompts

    count, max_tokens = sizes(args)
    prompts = load_prompts(args.prompts, count)
    answers = asyncio.run(_answers(target, prompts, max_tokens, args.parallel))
    return {"summary": summarize(answers), "answers": answers, "prompts": prompts, "max_tokens": max_tokens}


def _rows(results: dict[str, dict[str, Any]], name: str, measure: str) -> list[list[Any]]:
    rows = [[label, *(r["summary"][name][measure][lvl] for lvl in LEVELS), r["summary"][name]["spearman"],
             f"{r['summary'][name]['truncated']:.0%}"] for label, r in results.items()]
    paper = PAPER[name][measure]
    rows.append(["paper (HelpSteer)", *(paper.get(lvl) for lvl in LEVELS), None, ""])
    return rows


def finish(results: dict[str, dict[str, Any]], refs: dict[str, Any],
           args: argparse.Namespace) -> tuple[dict[str, Any], str, Any]:
    """Two tables (chars by verbosity, FKGL by complexity) and the matching two-panel plot."""
    count, max_tokens = sizes(args)
    head = [f"L{lvl}" for lvl in LEVELS]
    text = (f"{count} prompts x 5 levels per slider, greedy, max {max_tokens} tokens per answer "
            f"(truncated = share of answers cut by that cap). Paper: {PAPER_SOURCE}.\n\n"
            "Mean characters by **verbosity** level\n\n"
            + markdown_table(["variant", *head, "Spearman ρ", "truncated"], _rows(results, "verbosity", "chars"), 2)
            + "\nMean Flesch-Kincaid grade by **complexity** level\n\n"
            + markdown_table(["variant", *head, "Spearman ρ", "truncated"], _rows(results, "complexity", "fkgl"), 2))
    fig, axes = figure(2, width=5.0)
    for ax, (name, measure) in zip(axes[0], SWEEPS.items()):
        for label, r in results.items():
            ax.plot(LEVELS, [r["summary"][name][measure][lvl] for lvl in LEVELS], marker="o", label=label)
        paper = PAPER[name][measure]
        ax.plot(list(paper), list(paper.values()), "k--", marker="s", label="paper (HelpSteer)")
        ax.set_xlabel(f"{name} level")
        ax.set_ylabel("mean characters" if measure == "chars" else "Flesch-Kincaid grade")
        ax.set_xticks(LEVELS)
        ax.legend(fontsize=7)
    payload = {"variants": results, "paper": PAPER, "paper_source": PAPER_SOURCE}
    return payload, text, fig
