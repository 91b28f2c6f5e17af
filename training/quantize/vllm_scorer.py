"""Score an eval set in vLLM, as the variant is served (run as a child process; vLLM spawns workers).

    python -m steerserve.training.quantize.vllm_scorer MODEL_DIR bfloat16 eval.json raw.json

Perplexity from ``prompt_logprobs=0`` (the log-prob of every prompt token), MCQ from
``logprob_token_ids`` with raw logprobs: the same numbers the vLLM engine's
``next_token_logprobs`` gives ``/v1/mcq``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def score(model_dir: str, dtype: str, eval_set: dict[str, Any]) -> dict[str, list[list[float]]]:
    """Raw log-probs in the shape :func:`steerserve.training.quantize.scoring.score_eval_set` returns."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from steerserve.server.engines.vllm_engine import _configure_cpu_threads

    _configure_cpu_threads()
    longest = max(len(s) for s in eval_set["sequences"] + [i["ids"] for i in eval_set["mcq"]])
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, max_model_len=longest + 1, seed=0,
              logprobs_mode="raw_logprobs", kv_cache_memory_bytes=1 << 30)
    prompts = [TokensPrompt(prompt_token_ids=s) for s in eval_set["sequences"]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    token_logprobs = [
        [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], seq[1:])]
        for out, seq in zip(outs, eval_set["sequences"])
    ]
    mcq_logprobs = []
    for item in eval_set["mcq"]:
        params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=item["candidates"])
        step = llm.generate([TokensPrompt(prompt_token_ids=item["ids"])], params, use_tqdm=False)[0]
        mcq_logprobs.append([step.outputs[0].logprobs[0][c].logprob for c in item["candidates"]])
    return {"token_logprobs": token_logprobs, "mcq_logprobs": mcq_logprobs}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model, dtype, request, answer = sys.argv[1:5]
    raw = score(model, dtype, json.loads(Path(request).read_text()))
    Path(answer).write_text(json.dumps(raw))
