"""Does the slider move the answer? Verbosity 0-4 against length, complexity 0-4 against reading grade.

    steerserve bench steerability --variant default --prompts mt_bench --num-prompts 8

For each variant, every prompt is answered (greedy, or sampled with
``--temperature``) at each level of one slider while the others keep their
defaults. Reported per level: mean
characters and mean Flesch-Kincaid grade of the answer's prose (``measures.fk_grade``: code blocks dropped, a
line break ends a sentence); per slider: Spearman
correlation between level and measure over all answers. The HelpSteer paper's
figures are shown beside ours: chars 422 -> 1125 across verbosity, FKGL 8.49 -> 9.10
across complexity (SteerLM 43B). Each sweep is checked against the project's
targets: monotone across all five levels, chars(4)/chars(0) >= 3 and
FKGL(4) - FKGL(0) >= 2. ``--hold quality:3,humor:1`` holds other sliders at
given levels instead of their defaults (both sweeps), e.g. at the levels a
model's training lines carried most.

``--apm DIR`` (an attribute prediction model from ``steerserve train apm``) also
scores the answers given at default sliders, so a steered model can be checked
for collapse: its mean predicted helpfulness should stay near the base model's
(``benchmarks.no_collapse``; with ``--rescore``, the stored answers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from steerserve.measures import FK_MEASURE, LOOP_WORDS, chars, ends_unfinished, fk_grade, loops, mean, median, spearman
from steerserve.benchmarks.no_collapse import default_slider_quality
from steerserve.benchmarks.partial import AnswerLog
from steerserve.benchmarks.report import figure, markdown_table
from steerserve.benchmarks.servers import BenchTarget
from steerserve.clients.client import DEFAULT_TIMEOUT

NAME = "steerability"
RESUMABLE = True
"""Greedy or seeded answers do not depend on when they ran: an interrupted run goes on (benchmarks.partial)."""
ANSWER_LOG = True
"""Each answer is logged as it arrives, so a sweep stopped halfway resumes at the answer, not the variant."""
LEVELS = (0, 1, 2, 3, 4)
SWEEPS = {"verbosity": "chars", "complexity": "fkgl"}
PAPER = {"verbosity": {"chars": {0: 422.0, 4: 1125.0}}, "complexity": {"fkgl": {0: 8.49, 4: 9.10}}}
PAPER_SOURCE = "HelpSteer (Wang et al. 2023), SteerLM 43B on its held-out prompts"
TARGETS = {"verbosity": ("ratio", 3.0), "complexity": ("gap", 2.0)}  # chars x3, +2 grades, and monotone


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("steerability")
    group.add_argument("--prompts", default="mt_bench", help="mt_bench, or a JSONL/CSV file of prompts")
    group.add_argument("--num-prompts", type=int, help="prompts per level (default 8; quick 2)")
    group.add_argument("--spread-prompts", action="store_true",
                       help="take the --num-prompts prompts evenly across the set instead of its first ones: "
                            "MT-Bench is ordered by category, ten each, so its first ten are all writing prompts, "
                            "the easiest to stretch (a verbosity ratio of x4.66 there was x2.89 on the other 70)")
    group.add_argument("--answer-tokens", type=int, help="max tokens per answer (default 384; quick 24)")
    group.add_argument("--parallel", type=int, default=8, help="requests in flight at once")
    group.add_argument("--request-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="how long one answer may take (default %(default)g). A slow variant decoding --parallel "
                            "long answers at once can need more; changing it keeps the answers logged so far")
    group.add_argument("--apm", help="APM directory: also report mean predicted attributes at default sliders "
                                     "(with --rescore, of the stored answers: every variant scored by this APM)")
    group.add_argument("--sliders", type=swept_sliders, default=list(SWEEPS), metavar="NAME,...",
                       help="sweep only these sliders (default: verbosity,complexity); e.g. complexity alone to "
                            "check reading-level guidance, which leaves the verbosity sweep as it was")
    group.add_argument("--hold", type=held_sliders, default={}, metavar="NAME:LEVEL,...",
                       help="sliders held at these levels instead of their defaults in both sweeps (the swept "
                            "slider excepted), e.g. quality:3,humor:1 to ask for lines a model was trained on")
    group.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="sent with every answer (default 1: plain greedy). A 135M model loops under greedy "
                            "decoding until the token cap, whatever the slider says; 1.1-1.3 breaks the loops")
    group.add_argument("--frequency-penalty", type=float, default=0.0,
                       help="OpenAI frequency penalty sent with every answer (default 0). Unlike the repetition "
                            "penalty it counts only the answer's own tokens, so the end-of-turn token the prompt "
                            "holds is not penalised and short answers stay short")
    group.add_argument("--presence-penalty", type=float, default=0.0,
                       help="OpenAI presence penalty sent with every answer (default 0; answer tokens only)")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="sampling temperature (default 0: greedy). Sampled answers are seeded per prompt, the "
                            "same seed at every level, so levels differ by the slider alone and reruns agree")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature")
    group.add_argument("--seed", type=int, default=0, help="seed of prompt 0's answers (prompt i: seed + i)")


def swept_sliders(text: str) -> list[str]:
    """``--sliders``' value: known sweeps, in the report's order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SWEEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"sliders are {', '.join(SWEEPS)}; got {text!r}")
    return [name for name in SWEEPS if name in names]


def held_sliders(text: str) -> dict[str, int]:
    """``--hold``'s value through the attribute codec (a partial line), so bad names or levels fail up front."""
    from steerserve.attributes import InvalidAttribute, parse_attributes

    try:
        return parse_attributes(text, partial=True)
    except InvalidAttribute as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def decoding(args: argparse.Namespace) -> dict[str, Any]:
    """Request parameters shared by every answer: greedy unless ``--temperature``; penalty only when asked."""
    params: dict[str, Any] = {"temperature": args.temperature}
    if args.temperature > 0:
        params.update(top_p=args.top_p, seed=args.seed)
    if args.repetition_penalty != 1.0:
        params["repetition_penalty"] = args.repetition_penalty
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(args, name, 0.0):
            params[name] = getattr(args, name)
    return params


def describe_decoding(params: dict[str, Any]) -> str:
    """How the answers were decoded, for the report's first line."""
    text = (f"sampled at temperature {params['temperature']:g}, top-p {params['top_p']:g}, seed {params['seed']}"
            " + prompt index" if params["temperature"] > 0 else "greedy")
    penalties = [f"{name.replace('_', ' ')} {params[name]:g}"
                 for name in ("repetition_penalty", "frequency_penalty", "presence_penalty") if params.get(name)]
    return text + (f" with {', '.join(penalties)}" if penalties else "")


def answer_id(prompt: str, index: int, attributes: tuple[tuple[str, int], ...], guidance: float = 0.0,
              verbosity_guidance: float = 0.0, loop_guard: int = 0) -> str:
    """A request's name in the answer log: prompt index, its full attribute line, and the prompt's hash; and the
    server's reading-level and verbosity guidance and loop guard where on, so answers decoded otherwise are never
    reused."""
    line = ",".join(f"{name}:{level}" for name, level in attributes)
    guided = f"|guidance:{guidance:g}" if guidance else ""
    guided += f"|verbosity-guidance:{verbosity_guidance:g}" if verbosity_guidance else ""
    guided += f"|loop-guard:{loop_guard}" if loop_guard else ""
    return f"{index}|{line}|{hashlib.sha256(prompt.encode()).hexdigest()[:16]}{guided}"


async def _answers(target: BenchTarget, prompts: list[str], max_tokens: int, parallel: int,
                   params: dict[str, Any] | None = None, hold: dict[str, int] | None = None,
                   answer_log: AnswerLog | None = None, sliders: Sequence[str] = tuple(SWEEPS),
                   timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """Every (slider, level, prompt) answered with ``params`` (see ``decoding``); greedy or seeded, so reruns agree.

    Both sweeps hold the other slider at its default (or its ``hold`` level), so one level of each sweep asks
    the very same request as a level of the other: it is sent once and its answer counted in both. With an
    ``answer_log``, answers it holds are not asked again and each new one is logged as it arrives.
    """
    from steerserve.attributes import resolve_attributes
    from steerserve.clients.client import AsyncSteerClient

    held = dict(hold or {})

    def request_key(name: str, level: int, i: int) -> tuple[int, tuple[tuple[str, int], ...]]:
        return i, tuple(sorted(resolve_attributes({**held, name: level}).items()))

    jobs = [(name, level, i) for name in sliders for level in LEVELS for i in range(len(prompts))]
    requests = {request_key(*job): job for job in reversed(jobs)}
    ids = {key: answer_id(prompts[key[0]], *key, target.reading_level_guidance, target.verbosity_guidance,
                          target.loop_guard) for key in requests}
    limit = asyncio.Semaphore(parallel)
    params = dict(params or {"temperature": 0.0})

    async def one(client: AsyncSteerClient, log: AnswerLog | None, key: Any, name: str, level: int,
                  i: int) -> dict[str, Any]:
        if log is not None and ids[key] in log.answers:
            return measured(log.answers[ids[key]])  # logged by an earlier run, perhaps under older measures
        seeded = {**params, "seed": params["seed"] + i} if "seed" in params else params
        async with limit:
            reply = await client.chat(target.model, prompts[i], attributes={**held, name: level},
                                      max_tokens=max_tokens, **seeded)
        bar.update(1)
        answer = measured({"text": reply.choices[0].message.content, "tokens": reply.usage.completion_tokens,
                           "finish_reason": reply.choices[0].finish_reason})
        if log is not None:
            log.append(ids[key], answer)
        return answer

    with answer_log if answer_log is not None else contextlib.nullcontext() as log:
        kept = sum(ids[key] in log.answers for key in requests) if log is not None else 0
        bar = tqdm(total=len(requests), initial=kept, desc=f"steerability {target.label}", unit="answer")
        async with AsyncSteerClient(target.url, timeout=timeout) as client:
            replies = await asyncio.gather(*(one(client, log, key, *job) for key, job in requests.items()))
        bar.close()
    by_request = dict(zip(requests, replies))
    return [{"slider": name, "level": level, "prompt": i, **by_request[request_key(name, level, i)]}
            for name, level, i in jobs]


def measured(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer with its measures (characters, reading grade) taken from its text now."""
    return {**answer, "chars": chars(answer["text"]), "fkgl": fk_grade(answer["text"])}


def target_check(name: str, per_level: dict[int, float]) -> dict[str, Any]:
    """Monotone across the five levels, and the level-4 vs level-0 ratio (verbosity) or gap (complexity)."""
    values = [per_level[lvl] for lvl in LEVELS]
    kind, goal = TARGETS[name]
    low, high = values[0], values[-1]
    effect = (high / low if low else float("nan")) if kind == "ratio" else high - low
    monotone = all(b > a for a, b in zip(values, values[1:]))
    return {"monotone": monotone, kind: effect, "goal": goal, "met": monotone and effect >= goal}


def summarize(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Per slider: mean chars / FKGL per level, the median of its own measure per level, Spearman of level with
    that measure, the target check."""
    out: dict[str, Any] = {}
    for name, measure in SWEEPS.items():
        rows = [a for a in answers if a["slider"] == name]
        if not rows:  # not swept (--sliders)
            continue
        out[name] = {
            "measure": measure,
            "chars": {lvl: mean([a["chars"] for a in rows if a["level"] == lvl]) for lvl in LEVELS},
            "fkgl": {lvl: mean([a["fkgl"] for a in rows if a["level"] == lvl]) for lvl in LEVELS},
            "median": {lvl: median([a[measure] for a in rows if a["level"] == lvl]) for lvl in LEVELS},
            "spearman": spearman([a["level"] for a in rows], [a[measure] for a in rows]),
            "truncated": sum(a["finish_reason"] == "length" for a in rows) / max(len(rows), 1),
            "looping": sum(loops(a["text"]) for a in rows) / max(len(rows), 1),
            "unfinished": {lvl: _unfinished([a for a in rows if a["level"] == lvl]) for lvl in LEVELS},
        }
        out[name]["target"] = target_check(name, out[name][measure])
    return out


def remeasure(result: dict[str, Any]) -> dict[str, Any]:
    """One variant's result with every answer measured again and its summary rebuilt: a result stored by an
    earlier version (rescored, or kept from an interrupted run) gets today's measures and summary fields."""
    answers = [measured(a) for a in result["answers"]]
    return {**result, "answers": answers, "summary": summarize(answers)}


def _unfinished(rows: list[dict[str, Any]]) -> float:
    """Of the answers that ended on their own (not at the cap), the share whose last sentence is unfinished."""
    ended = [a for a in rows if a["finish_reason"] == "stop"]
    return sum(ends_unfinished(a["text"]) for a in ended) / len(ended) if ended else 0.0


def sizes(args: argparse.Namespace) -> tuple[int, int]:
    return (args.num_prompts or (2 if args.quick else 8), args.answer_tokens or (24 if args.quick else 384))


def measure(target: BenchTarget, args: argparse.Namespace, answer_log: AnswerLog | None = None) -> dict[str, Any]:
    from steerserve.clients.loadgen.prompts import load_prompts

    count, max_tokens = sizes(args)
    prompts = load_prompts(args.prompts, count)
    if args.spread_prompts and count < len(every := load_prompts(args.prompts)):
        prompts = [every[i * len(every) // count] for i in range(count)]
    params = decoding(args)
    answers = asyncio.run(_answers(target, prompts, max_tokens, args.parallel, params, args.hold, answer_log,
                                   args.sliders, args.request_timeout))
    result = {"summary": summarize(answers), "answers": answers, "prompts": prompts, "max_tokens": max_tokens,
              "decoding": params, "reading_level_guidance": target.reading_level_guidance,
              "verbosity_guidance": target.verbosity_guidance, "loop_guard": target.loop_guard}
    if args.apm:
        result["default_slider_apm"] = default_slider_quality(args.apm, prompts, answers)
    return result


def _shown(value: float | None, decimals: int) -> str:
    """A level's figure in a table cell; none to show (no answer had a grade, stored as JSON null) is a dash."""
    return "—" if value is None or value != value else f"{value:.{decimals}f}"


def _rows(results: dict[str, dict[str, Any]], name: str, measure: str) -> list[list[Any]]:
    rows = []
    for label, r in results.items():
        summary = r["summary"][name]
        check = summary["target"]
        kind = TARGETS[name][0]
        value = check[kind]  # None where undefined (nothing at level 0), as the JSON outputs store NaN
        effect = "—" if value is None or value != value else f"x{value:.2f}" if kind == "ratio" else f"{value:+.2f}"
        rows.append([label, *(summary[measure][lvl] for lvl in LEVELS), summary["spearman"], effect,
                     "yes" if check["monotone"] else "no", "met" if check["met"] else "not met",
                     f"{summary['truncated']:.0%}",
                     f"{summary['looping']:.0%}",
                     " / ".join(f"{summary['unfinished'][lvl]:.0%}" for lvl in LEVELS),
                     " / ".join(_shown(summary["median"][lvl], 0 if measure == "chars" else 1) for lvl in LEVELS)])
    paper = PAPER[name][measure]
    paper_effect = (f"x{paper[4] / paper[0]:.2f}" if TARGETS[name][0] == "ratio" else f"{paper[4] - paper[0]:+.2f}")
    rows.append(["paper (HelpSteer)", *(paper.get(lvl) for lvl in LEVELS), None, paper_effect, "", "", "", "", "", ""])
    return rows


def _quality_table(results: dict[str, dict[str, Any]]) -> str:
    scored = {label: r["default_slider_apm"] for label, r in results.items() if "default_slider_apm" in r}
    if not scored:
        return ""
    names = list(next(iter(scored.values())))
    rows = [[label, *(values[n] for n in names)] for label, values in scored.items()]
    return ("\nMean APM prediction (0-4) for the answers at default sliders (no-collapse check)\n\n"
            + markdown_table(["variant", *names], rows, 2))


def _guidance_note(results: dict[str, dict[str, Any]], slider: str) -> str:
    """Which servers pushed ``slider`` while decoding, and how hard (their model cards)."""
    key, what, unit = {"complexity": ("reading_level_guidance", "reading-level guidance", "logits per syllable"),
                       "verbosity": ("verbosity_guidance", "verbosity guidance", "end-token logits")}[slider]
    guided = {label: r.get(key, 0.0) for label, r in results.items()}
    if not any(guided.values()):
        return f" (no {what}: the prompt alone)"
    return f" ({what}, {unit} at level 0: " + ", ".join(f"{label} {value:g}" for label, value in guided.items()) + ")"


def _loop_note(results: dict[str, dict[str, Any]]) -> str:
    """Which servers ended looping answers (their loop guard), in one sentence; none: empty."""
    guarded = {label: r.get("loop_guard", 0) for label, r in results.items()}
    if not any(guarded.values()):
        return ""
    return ("Loop guard (an answer ends at the Nth copy in a row of a repeated stretch of tokens): "
            + ", ".join(f"{label} {n or 'off'}" for label, n in guarded.items()) + ". ")


def _sweep_table(results: dict[str, dict[str, Any]], name: str, head: list[str]) -> str:
    """One slider's table: the measure per level, Spearman, the level-4 vs level-0 effect, the target check."""
    results = swept(results, name)
    if name == "verbosity":
        title, effect = "Mean characters by **verbosity** level" + _guidance_note(results, name), "L4 / L0"
    else:
        title, effect = "Mean Flesch-Kincaid grade by **complexity** level" + _guidance_note(results, name), "L4 - L0"
    return (f"\n{title}\n\n"
            + markdown_table(["variant", *head, "Spearman ρ", effect, "monotone", "target", "truncated", "looping",
                              "unfinished L0-L4", "median L0-L4"],
                             _rows(results, name, SWEEPS[name]), 2))


def swept(results: dict[str, dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    """The variants that swept slider ``name`` (results joined by ``--rescore`` may not all have)."""
    return {label: r for label, r in results.items() if name in r["summary"]}


def finish(results: dict[str, dict[str, Any]], refs: dict[str, Any],
           args: argparse.Namespace) -> tuple[dict[str, Any], str, Any]:
    """A table per swept slider (chars by verbosity, FKGL by complexity) and the matching plot panels."""
    count, max_tokens = sizes(args)
    head = [f"L{lvl}" for lvl in LEVELS]
    others = "the other sliders at their defaults" + (
        f", except {', '.join(f'{k} {v}' for k, v in args.hold.items())}" if args.hold else "")
    text = (f"{count} prompts x 5 levels per slider ({others}), {describe_decoding(decoding(args))}, max "
            f"{max_tokens} tokens per answer (truncated = share of answers cut by that cap; looping = share whose "
            f"second half repeats, under half its {LOOP_WORDS}-word sequences distinct; unfinished = share of the "
            f"answers that ended on their own whose last sentence is unfinished, per level). {_loop_note(results)}"
            f"Targets: monotone, chars x3 from verbosity 0 to 4, +2 grades from complexity 0 to 4. "
            f"Paper: {PAPER_SOURCE}.\n"
            + "".join(_sweep_table(results, name, head) for name in args.sliders)
            + _quality_table(results))
    fig, axes = figure(len(args.sliders), width=5.0)
    for ax, name in zip(axes[0], args.sliders):
        measure = SWEEPS[name]
        paper = PAPER[name][measure]
        curves = {label: ([r["summary"][name][measure][lvl] for lvl in LEVELS],
                          [r["summary"][name]["median"][lvl] for lvl in LEVELS])
                  for label, r in swept(results, name).items()}
        # A looping answer's grade has no ceiling (one can move a level's mean by 50 grades): grades get an axis
        # the medians and the paper fit in, and a mean above it is drawn at its top with its value.
        top = None if measure == "chars" else 1.6 * max(
            [*paper.values(), *(m for _, medians in curves.values() for m in medians)])
        for label, (means, medians) in curves.items():
            (line,) = ax.plot(LEVELS, [min(m, top) if top else m for m in means], marker="o", label=label)
            # dotted, same colour: where a looping answer throws the mean
            ax.plot(LEVELS, medians, ":", color=line.get_color())
            for lvl, mean in zip(LEVELS, means):
                if top and mean > top:
                    ax.annotate(f"{mean:.0f}", (lvl, top), xytext=(3, -10), textcoords="offset points", fontsize=7,
                                color=line.get_color())
        if top:
            ax.set_ylim(top=top * 1.02)
        ax.plot(list(paper), list(paper.values()), "k--", marker="s", label="paper (HelpSteer)")
        ax.set_xlabel(f"{name} level")
        ax.set_ylabel(("characters" if measure == "chars" else "Flesch-Kincaid grade") + " (mean; dotted: median)")
        ax.set_xticks(LEVELS)
        ax.legend(fontsize=7)
    payload = {"variants": results, "paper": PAPER, "paper_source": PAPER_SOURCE, "measures": {"fkgl": FK_MEASURE}}
    return payload, text, fig
