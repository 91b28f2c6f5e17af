"""Measured quality of a variant: perplexity on a held-out text and accuracy on a fixed MMLU sample.

    eval_set = build_eval_set(source_dir, QualityConfig())
    metrics = measure(variant_dir, Precision.NF4, "transformers", eval_set)   # {"perplexity": ..., ...}

MCQ prompts are rendered exactly as the server renders them (shared renderer,
``Answer:`` prefix, next-token log-probs of " A".." D" renormalised), so the
accuracy here is the accuracy ``/v1/mcq`` gives. Each scorer runs the variant
the way it is served (or the closest in-process equivalent) and returns raw
log-probs; :func:`summarise` turns them into numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steerserve.precision import Precision, compute_dtype_here
from steerserve.prompts import MCQ_ANSWER_PREFIX, SteeringMethod, mcq_answer_token_text, render_chat, render_mcq_question
from steerserve.training.quantize.calibration import (
    MMLU_TEST, MT_BENCH_ANSWERS, held_out_text, mmlu_rows, served_steering,
)
from steerserve.training.output import write_json_atomic

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """How much held-out data to score (the defaults take well under a minute for a 135M model)."""

    text_chars: int = 16000
    """Characters of MT-Bench reference answers scored for perplexity."""
    chunk_tokens: int = 256
    """Perplexity window: the text is cut into independent chunks of this many tokens."""
    mcq_per_subject: int = 2
    """MMLU test questions per subject (57 subjects), the first ones of each file."""
    mcq_max_items: int | None = None
    """Keep only the first N of those (quick checks); None keeps all."""


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    """As the server tokenizes a rendered prompt: no second BOS when the template wrote one."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def _mcq_items(tokenizer: Any, steering: SteeringMethod, config: QualityConfig, limit: int) -> list[dict[str, Any]]:
    candidates = [tokenizer.encode(mcq_answer_token_text(i), add_special_tokens=False) for i in range(4)]
    if any(len(c) != 1 for c in candidates):
        logger.warning("the tokenizer has no single tokens for ' A'..' D'; no MCQ accuracy")
        return []
    template = (lambda m: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)) \
        if tokenizer.chat_template else None
    items = []
    for row in mmlu_rows(MMLU_TEST, config.mcq_per_subject):
        turn = render_mcq_question(row["question"], row["choices"])
        prompt = render_chat([{"role": "user", "content": turn}], None, steering, template, MCQ_ANSWER_PREFIX)
        ids = _tokenize(tokenizer, prompt)
        if len(ids) < limit:
            items.append({"ids": ids, "candidates": [c[0] for c in candidates], "answer": row["answer"]})
    return items[: config.mcq_max_items]


def build_eval_set(source: Path, config: QualityConfig) -> dict[str, Any]:
    """Token ids to score, built once from the source's tokenizer (quantization keeps the tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    limit = getattr(AutoConfig.from_pretrained(str(source)), "max_position_embeddings", 2048)
    chunk = min(config.chunk_tokens, limit - 1)
    ids = tokenizer(held_out_text(config.text_chars), add_special_tokens=False)["input_ids"]
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sequences = [head + ids[i : i + chunk] for i in range(0, len(ids) - 1, chunk)]
    return {
        "sequences": [s for s in sequences if len(s) > 1],
        "mcq": _mcq_items(tokenizer, served_steering(source, tokenizer), config, limit),
        "description": {
            "perplexity_text": f"{MT_BENCH_ANSWERS} (first {config.text_chars} characters, "
                               f"{len(ids)} tokens, windows of {chunk})",
            "mcq": f"{MMLU_TEST} (first {config.mcq_per_subject} per subject"
                   + (f", first {config.mcq_max_items} items" if config.mcq_max_items else "")
                   + ", 4 choices, next-token ' A'..' D')",
        },
    }


def summarise(raw: dict[str, list[list[float]]], eval_set: dict[str, Any]) -> dict[str, Any]:
    """Perplexity, MCQ accuracy and mean probability of the right answer."""
    flat = [lp for seq in raw["token_logprobs"] for lp in seq]
    result: dict[str, Any] = {"perplexity": math.exp(-sum(flat) / len(flat)), "perplexity_tokens": len(flat)}
    items = eval_set["mcq"]
    if items:
        right, probability = 0, 0.0
        for item, logprobs in zip(items, raw["mcq_logprobs"]):
            top = max(logprobs)
            weights = [math.exp(lp - top) for lp in logprobs]
            right += int(max(range(len(weights)), key=weights.__getitem__) == item["answer"])
            probability += weights[item["answer"]] / sum(weights)
        result.update(mcq_accuracy=right / len(items), mcq_answer_probability=probability / len(items),
                      mcq_items=len(items))
    return result


# ---- scorers: run a variant and return raw log-probs ---------------------------------------------


def _score_transformers(model_dir: Path, precision: Precision, eval_set: dict[str, Any]) -> dict[str, Any]:
    """float and bitsandbytes checkpoints, loaded and computed as the transformers engine does."""
    from steerserve.server.engines.base import EngineConfig
    from steerserve.server.engines.hf_engine import load_model
    from steerserve.training.quantize.scoring import score_eval_set

    model = load_model(str(model_dir), EngineConfig(model=str(model_dir), precision=precision))
    return score_eval_set(model, eval_set)


def run_tool(argv: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    """Run a helper process (in ``cwd``, with ``env`` added); on failure raise with the tail of its output."""
    logger.info("running %s", " ".join(argv[:4]))
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n" + "\n".join(tail))


def _score_vllm(model_dir: Path, precision: Precision, eval_set: dict[str, Any]) -> dict[str, Any]:
    """GPTQ and compressed-tensors checkpoints, in vLLM as served (a subprocess: vLLM spawns workers)."""
    with tempfile.TemporaryDirectory(prefix="steerserve-score-") as tmp:
        request, answer = Path(tmp) / "eval.json", Path(tmp) / "raw.json"
        request.write_text(json.dumps(eval_set))
        run_tool([sys.executable, "-m", "steerserve.training.quantize.vllm_scorer", str(model_dir),
                  compute_dtype_here(precision), str(request), str(answer)], "scoring in vLLM")
        return json.loads(answer.read_text())


def _score_llamacpp(model_dir: Path, precision: Precision, eval_set: dict[str, Any]) -> dict[str, Any]:
    from steerserve.training.quantize.gguf import score_gguf

    return score_gguf(model_dir, eval_set)


Scorer = Callable[[Path, Precision, dict[str, Any]], dict[str, Any]]
SCORERS: dict[str, Scorer] = {
    "transformers": _score_transformers,
    "vllm": _score_vllm,
    "llama.cpp": _score_llamacpp,
}


def measure(model_dir: Path, precision: Precision, scorer: str, eval_set: dict[str, Any]) -> dict[str, Any]:
    """Quality of one checkpoint through the named scorer."""
    return summarise(SCORERS[scorer](Path(model_dir), precision, eval_set), eval_set)


def measure_source(source: Path, precision: Precision, eval_set: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """:func:`measure` of a 16-bit source through transformers, remembered across quantizations.

    Every precision made from one source is compared with the same source figures; measuring them once
    instead of once per precision saves minutes per variant on a CPU. The key covers the weights (path, size
    and modification time of each file), the eval set and the compute dtype, so a retrained source or another
    eval set is measured afresh.
    """
    source = Path(source).resolve()
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source.glob("*.safetensors"))
    key_text = json.dumps({"source": str(source), "weights": weights, "dtype": compute_dtype_here(precision),
                           "sequences": eval_set["sequences"], "mcq": eval_set["mcq"]}, sort_keys=True)
    path = Path(cache_dir) / "source-quality" / f"{hashlib.sha256(key_text.encode()).hexdigest()[:32]}.json"
    if path.is_file():
        logger.info("source quality from %s", path)
        return json.loads(path.read_text())
    quality = measure(source, precision, "transformers", eval_set)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, quality)  # a concurrent quantization reads a whole file or none
    return quality
