"""The verbosity slider's end push inside vLLM: the end-of-turn token raised at sentence ends, per request.

The push depends on the answer so far (only right after a finished sentence, :mod:`steerserve.verbosity_guidance`),
so no static ``logit_bias`` can carry it. This processor holds the engine's end guide (built from its own tokenizer
at start) and receives ``(verbosity, strength)`` per request in ``SamplingParams.extra_args``; vLLM hands it each
request's live list of output tokens, and a step adds the push to the end-token logits of the requests whose
answer now ends a sentence. Where it adds is where the transformers and llama.cpp engines add it (with the logit
bias, before the penalties), so greedy answers agree across engines.

    engine_args["logits_processors"] = [..., VERBOSITY_PROCESSOR]     # vllm_args.engine_kwargs, always
    SamplingParams(..., extra_args={VERBOSITY_ARG: [0, 6.0]})         # verbosity 0 at strength 6
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates

from steerserve.server.engines.vllm_args import slider_extra_arg
from steerserve.verbosity_guidance import push

if TYPE_CHECKING:
    from vllm.config import VllmConfig


VERBOSITY_ARG = "steerserve_verbosity"
"""``SamplingParams.extra_args`` key: ``[verbosity level, strength]``."""


def verbosity_of(params: SamplingParams) -> float:
    """The logits a request's end push adds at a sentence end; 0 where it asks for none."""
    pair = slider_extra_arg(params.extra_args, VERBOSITY_ARG, "verbosity")
    return 0.0 if pair is None else push(*pair)


class VerbosityLogitsProcessor(LogitsProcessor):
    """Adds each pushed request's end push at its sentence ends (see the module doc)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        slider_extra_arg(sampling_params.extra_args, VERBOSITY_ARG, "verbosity")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        from steerserve.verbosity_guidance import end_guide_for

        self.guide = end_guide_for(AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer))
        self.end_ids = torch.tensor(self.guide.end_ids, dtype=torch.long, device=device)
        self.running: dict[int, tuple[float, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        """The push changes which token is likeliest: greedy requests need it too."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Requests joining, leaving or moving in the batch; each keeps vLLM's live list of its output tokens."""
        process_dict_updates(self.running, batch_update,
                             lambda params, _, output_ids: (logits, output_ids)
                             if (logits := verbosity_of(params)) > 0 else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (value, output_ids) in self.running.items():
            if self.guide.at_sentence_end(output_ids):
                logits[index, self.end_ids] += value
        return logits
