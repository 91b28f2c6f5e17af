"""Log-probabilities of token sequences from any causal LM with HF-style ``forward`` (torch only).

Kept free of steerserve imports so the isolated tool environments (llm-compressor's
venv) can run it by file path; ``quality`` turns its numbers into metrics::

    raw = score_eval_set(model, {"sequences": [[1, 2, 3]], "mcq": [{"ids": [1, 2], "candidates": [5, 6]}]})
"""

from __future__ import annotations

from typing import Any

import torch


def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return out.logits[0].float().log_softmax(-1)


def score_eval_set(model: Any, eval_set: dict[str, Any], progress: bool = True) -> dict[str, list[list[float]]]:
    """Per-token log-probs of each sequence (from its 2nd token) and candidate log-probs per MCQ prompt."""
    try:
        from tqdm import tqdm
    except ImportError:  # the tool environments may lack tqdm
        def tqdm(items, **_):  # type: ignore[no-redef]
            return items
    token_logprobs = []
    for ids in tqdm(eval_set["sequences"], desc="perplexity", disable=not progress):
        logprobs = _logits(model, ids)
        targets = torch.tensor(ids[1:], device=logprobs.device)
        token_logprobs.append(logprobs[:-1].gather(-1, targets[:, None])[:, 0].tolist())
    mcq_logprobs = []
    for item in tqdm(eval_set["mcq"], desc="mcq", disable=not progress):
        mcq_logprobs.append(_logits(model, item["ids"])[-1, item["candidates"]].tolist())
    return {"token_logprobs": token_logprobs, "mcq_logprobs": mcq_logprobs}
