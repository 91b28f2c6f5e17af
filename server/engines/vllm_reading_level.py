"""The complexity slider's reading-level guidance inside vLLM: one dense bias row per (level, strength).

Sent as an OpenAI ``logit_bias``, a guided request carries a map of ~34,000 token ids (most of the vocabulary
lengthens a word), and vLLM's logit-bias processor rebuilds its index tensors from every running request's map
whenever the batch changes: guided requests cost far more to schedule than unguided ones. This processor holds
the guide (:func:`steerserve.reading_level.guide_for`, built from the engine's own tokenizer at start) and
receives only ``(level, strength)`` per request in ``SamplingParams.extra_args``; each distinct pair becomes one
dense row, made once, and a step adds the running requests' rows to their logits in one indexed add. The
values are exactly the guide's ``logit_bias(level, strength)``, applied where vLLM applies a logit bias (before
the penalties), so answers match the ``logit_bias`` path token for token.

    engine_args["logits_processors"] = [READING_LEVEL_PROCESSOR]    # vllm_args.engine_kwargs, guidance > 0
    SamplingParams(..., extra_args={READING_LEVEL_ARG: [0, 2.0]})   # complexity 0 at strength 2
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates

from steerserve.attributes import MAX_LEVEL
from steerserve.server.engines.vllm_args import slider_extra_arg

if TYPE_CHECKING:
    from vllm.config import VllmConfig


READING_LEVEL_ARG = "steerserve_reading_level"
"""``SamplingParams.extra_args`` key: ``[complexity level, strength]``."""


def reading_level_of(params: SamplingParams) -> tuple[int, float] | None:
    """A request's ``(level, strength)``, or None where it asks for no guidance (strength 0, or the top level,
    whose bias is zero)."""
    pair = slider_extra_arg(params.extra_args, READING_LEVEL_ARG, "complexity")
    return pair if pair is not None and pair[1] > 0 and pair[0] < MAX_LEVEL else None


class ReadingLevelLogitsProcessor(LogitsProcessor):
    """Adds each guided request's reading-level row to its logits (see the module doc)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        slider_extra_arg(sampling_params.extra_args, READING_LEVEL_ARG, "complexity")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        from steerserve.reading_level import guide_for

        model_config = vllm_config.model_config
        self.device = device
        self.vocab_size = model_config.get_vocab_size()
        self.guide = guide_for(AutoTokenizer.from_pretrained(model_config.tokenizer))
        self.rows: dict[tuple[int, float], torch.Tensor] = {}
        self.running: dict[int, tuple[int, float]] = {}
        self.indices = torch.empty(0, dtype=torch.long, device=device)
        self.bias = torch.empty(0, self.vocab_size, device=device)

    def is_argmax_invariant(self) -> bool:
        """Guidance changes which token is likeliest: greedy requests need it too."""
        return False

    def _row(self, key: tuple[int, float]) -> torch.Tensor:
        if key not in self.rows:
            row = torch.zeros(self.vocab_size, dtype=torch.float32)
            bias = self.guide.logit_bias(*key)
            ids = torch.tensor(list(bias), dtype=torch.long)
            keep = ids < self.vocab_size
            row[ids[keep]] = torch.tensor(list(bias.values()), dtype=torch.float32)[keep]
            self.rows[key] = row.to(self.device)
        return self.rows[key]

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Requests joining, leaving or moving in the batch (vLLM's own bookkeeping); rows restacked on change."""
        if process_dict_updates(self.running, batch_update, lambda params, _, __: reading_level_of(params)):
            order = sorted(self.running)
            self.indices = torch.tensor(order, dtype=torch.long, device=self.device)
            self.bias = (torch.stack([self._row(self.running[i]) for i in order]) if order
                         else torch.empty(0, self.vocab_size, device=self.device))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.running:
            width = min(logits.shape[-1], self.vocab_size)
            logits[self.indices, :width] += self.bias[:, :width].to(logits.dtype)
        return logits

