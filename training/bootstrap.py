"""SteerLM bootstrapping: sample responses across attribute levels from the base model.

Open Assistant gives one to three human replies per prompt, mostly long and of
middling reading level, so an attribute-conditioned model trained on them alone
never sees a short or a very plain answer to the same question. This recipe
asks the base model for ``samples_per_prompt`` answers to every prompt, each
under a different plain-language verbosity and complexity instruction (the
shared renderer's ``instructions`` method; every five samples give a prompt
every verbosity and every complexity level once, each round in new pairs) and
temperature. The instructions only spread the samples: the labels come later,
*measured* (``annotate`` with ``measured: [verbosity, complexity]``) and
predicted by the APM, never copied from the instruction::

    steerserve train bootstrap --config training/recipes/bootstrap-default.yaml --output runs/bootstrap
    # -> runs/bootstrap/samples.jsonl: {"prompt", "response", "source": "model"|"human", "instructed", ...}

With ``keep_source_responses`` the human replies are written too, so the file
is the whole AC-SFT pool. Interrupted runs resume from the samples already drawn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from steerserve.measures import LEVELS, chars, fk_grade, words
from steerserve.training import distributed, runner
from steerserve.training.config import CommonConfig, ConfigError, option
from steerserve.training.data.attribute_rows import FORMATS, load_attribute_rows
from steerserve.training.manifest import build_manifest, data_entry
from steerserve.training.sampling import ENGINES, sample

logger = logging.getLogger(__name__)

RECIPE = "bootstrap"
SAMPLES = "samples.jsonl"
PARTIAL = "samples.part.jsonl"


@dataclasses.dataclass
class BootstrapConfig(CommonConfig):
    """Sample responses across verbosity/complexity levels for the prompts of attribute rows."""

    samples_per_prompt: int = option(5, "Model answers per prompt; levels cycle so each prompt covers all five.")
    temperatures: list[float] = option([0.3, 0.7, 1.0], "Temperatures drawn from per sample.")
    top_p: float = option(0.95, "Nucleus sampling mass.")
    max_tokens: int = option(400, "Longest answer sampled, in tokens.")
    max_prompt_words: int = option(200, "Skip prompts longer than this (the AC-SFT max_length must fit them).")
    keep_source_responses: bool = option(True, "Also write the data set's own replies (source: human).")
    engine: str = option("vllm", "Sampling engine: vllm (batched, fast) or transformers (reference).")
    reading_level_guidance: float = option(
        0.0, "Decode each sample under the server's reading-level guidance for its instructed complexity at this "
             "strength (steerserve.reading_level; 0: instructions alone). The base model's instructed samples "
             "barely differ in grade; guided ones do, so AC-SFT sees one prompt answered at several grades.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_choice("data_format", FORMATS)
        self.check_choice("engine", ENGINES)
        self.check_positive("samples_per_prompt", "max_tokens", "max_prompt_words")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ConfigError("temperatures: give one or more values >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.reading_level_guidance < 0:
            raise ConfigError(f"reading_level_guidance: must be >= 0, got {self.reading_level_guidance}")


def unique_prompts(rows: Sequence[dict[str, Any]], max_words: int) -> list[str]:
    """Distinct prompts in first-seen order, long ones left out."""
    seen: dict[str, None] = {}
    for row in rows:
        if words(row["prompt"]) <= max_words:
            seen.setdefault(row["prompt"], None)
    return list(seen)


def sample_plan(prompts: Sequence[str], config: BootstrapConfig) -> list[dict[str, Any]]:
    """One entry per sample: prompt, instructed levels, temperature and seed (deterministic by seed)."""
    rng = random.Random(config.seed)
    plan = []
    for p, prompt in enumerate(prompts):
        verbosity = rng.sample(range(LEVELS), LEVELS)
        complexity = rng.sample(range(LEVELS), LEVELS)
        for s in range(config.samples_per_prompt):
            # Each round of five shifts the complexity pairing by one (a Latin square): ten samples cover ten
            # distinct (verbosity, complexity) cells of a prompt, not the same five twice.
            plan.append({"prompt": prompt, "instructed": {"verbosity": verbosity[s % LEVELS],
                                                          "complexity": complexity[(s + s // LEVELS) % LEVELS]},
                         "temperature": rng.choice(config.temperatures), "seed": config.seed * 1_000_003 + p * 97 + s})
    return plan


def render_requests(plan: Sequence[dict[str, Any]], tokenizer: Any, config: BootstrapConfig) -> list[dict[str, Any]]:
    """The sampling requests: each prompt rendered with its instruction exactly as the server would."""
    from steerserve.server.variants import default_steering

    method = default_steering(tokenizer)
    return [{"prompt": runner.chat_prompt([{"role": "user", "content": entry["prompt"]}], entry["instructed"],
                                          method, tokenizer),
             "temperature": entry["temperature"], "top_p": config.top_p, "max_tokens": config.max_tokens,
             "seed": entry["seed"],
             **({"reading_level": [entry["instructed"]["complexity"], config.reading_level_guidance]}
                if config.reading_level_guidance else {})} for entry in plan]


def by_instructed_level(samples: Sequence[dict[str, Any]], name: str,
                        measure: Callable[[str], float]) -> dict[int, list[float]]:
    """``measure`` of each sample's response, grouped by the level of ``name`` it was instructed at."""
    grouped: dict[int, list[float]] = {}
    for row in samples:
        grouped.setdefault(row["instructed"][name], []).append(measure(row["response"]))
    return dict(sorted(grouped.items()))


def level_spread(samples: Sequence[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Mean characters per instructed level: did the instructions spread the samples at all?"""
    return {name: {level: round(sum(v) / len(v), 1) for level, v in by_instructed_level(samples, name, chars).items()}
            for name in ("verbosity", "complexity")}


def grade_spread(samples: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Median Flesch-Kincaid grade of the finished samples per instructed complexity level.

    Tells before any training whether the instructions spread reading level at all (complexity labels are
    measured, so the AC-SFT set can only hold the spread the samples have). The median, because one run-on
    reply without a full stop scores grade 40 or more; capped replies are left out as annotate leaves them out, and
    so are replies without prose (code only: no reading level, NaN).
    """
    finished = [row for row in samples if row["finish_reason"] != "length"]
    graded = {level: [grade for grade in grades if not math.isnan(grade)]
              for level, grades in by_instructed_level(finished, "complexity", fk_grade).items()}
    return {level: round(statistics.median(grades), 1) for level, grades in graded.items() if grades}


def run(config: BootstrapConfig, output: Path, force: bool = False,
        callbacks: Sequence[Callable[[int], None]] = ()) -> Path:
    """Sample, write ``samples.jsonl`` (model + optionally human replies) and the manifest."""
    if distributed.world_size() > 1:
        raise ValueError("bootstrap runs in one process (vLLM batches internally): start it without a launcher")
    run_dir, base, base_name = runner.start(RECIPE, config, output, force)
    work = run_dir.work
    tokenizer = runner.load_tokenizer(base)
    rows, report = load_attribute_rows(config.data, config.data_format, config.data_split, require_labels=False)
    prompts = unique_prompts(rows, config.max_prompt_words)[: config.limit]
    plan = sample_plan(prompts, config)
    logger.info("sampling %d answers for %d prompts with %s", len(plan), len(prompts), config.engine)
    drawn = sample(base, render_requests(plan, tokenizer, config), work / PARTIAL, config.engine)
    model_rows = [{"prompt": entry["prompt"], "response": got["text"].strip(), "source": "model",
                   "instructed": entry["instructed"], "temperature": entry["temperature"],
                   "finish_reason": got["finish_reason"], "tokens": got["tokens"]}
                  for entry, got in zip(plan, drawn) if got["text"].strip()]
    kept = set(prompts)
    human_rows = [{"prompt": row["prompt"], "response": row["response"], "source": "human"}
                  for row in rows if row["prompt"] in kept] if config.keep_source_responses else []
    with open(work / SAMPLES, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in model_rows + human_rows)
    (work / PARTIAL).unlink()
    for callback in callbacks:
        callback(len(plan))
    metrics = {"prompts": len(prompts), "model_samples": len(model_rows), "empty_samples": len(plan) - len(model_rows),
               "human_responses": len(human_rows),
               "cut_at_max_tokens": sum(r["finish_reason"] == "length" for r in model_rows),
               "mean_chars_by_instructed_level": level_spread(model_rows),
               "median_fk_grade_by_instructed_complexity": grade_spread(model_rows)}
    runner.drop_base(work)
    manifest = build_manifest(RECIPE, config, base_model=base_name,
                              data=[data_entry(config.data, report, config.data_format)], metrics=metrics,
                              steps=len(plan), steering=None, servable=False, samples=SAMPLES,
                              resumed=run_dir.resumed)
    return run_dir.commit(manifest)


CONFIG = BootstrapConfig
