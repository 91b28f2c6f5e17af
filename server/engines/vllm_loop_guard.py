"""The loop guard inside vLLM: a request whose answer loops verbatim gets the end-of-turn token as its only choice.

Whether an answer loops depends on all of it so far (:mod:`steerserve.loop_guard`), so it cannot travel as a static
bias. This processor holds the engine's end-of-turn tokens (read from its own tokenizer at start) and receives
the copies that end a loop per request in ``SamplingParams.extra_args``; vLLM hands it each request's live list of
output tokens, and each step feeds the new tokens to that request's watch. The transformers and llama.cpp engines
do the same in :func:`steerserve.server.engines.sampling.adjust_logits`, so greedy answers agree across engines.

    engine_args["logits_processors"] = [..., LOOP_GUARD_PROCESSOR]    # vllm_args.engine_kwargs, always
    SamplingParams(..., extra_args={LOOP_GUARD_ARG: 4})               # end at the fourth copy in a row
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates

from steerserve.loop_guard import LoopWatch

if TYPE_CHECKING:
    from vllm.config import VllmConfig


LOOP_GUARD_ARG = "steerserve_loop_repeats"
"""``SamplingParams.extra_args`` key: the copies in a row that end an answer (an int >= 2)."""


def loop_repeats_of(params: SamplingParams) -> int:
    """The copies that end a request's answer; 0 where it asks for no guard. Malformed: ValueError, which vLLM
    reports when the request is added (``validate_params``)."""
    value: Any = (params.extra_args or {}).get(LOOP_GUARD_ARG)
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
        return 0 if params.ignore_eos else value
    raise ValueError(f"{LOOP_GUARD_ARG} must be an int >= 2, got {value!r}")


class LoopGuardLogitsProcessor(LogitsProcessor):
    """Ends each guarded request's answer once it loops (see the module doc)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        loop_repeats_of(sampling_params)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        from steerserve.verbosity_guidance import end_token_ids

        tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        self.end_ids = torch.tensor(end_token_ids(tokenizer), dtype=torch.long, device=device)
        self.running: dict[int, tuple[LoopWatch, int, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        """Ending a loop changes which token is likeliest: greedy requests need it too."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Requests joining, leaving or moving in the batch; each keeps a watch and vLLM's live output list."""
        process_dict_updates(self.running, batch_update,
                             lambda params, _, output_ids: (LoopWatch(repeats), params.min_tokens, output_ids)
                             if (repeats := loop_repeats_of(params)) else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (watch, min_tokens, output_ids) in self.running.items():
            if len(output_ids) >= min_tokens and watch.feed(output_ids):
                logits[index] = float("-inf")
                logits[index, self.end_ids] = 0.0
        return logits
