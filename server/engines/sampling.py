"""Token choice for the engines that sample in our own code (transformers, llama.cpp).

vLLM samples inside its engine; these two must pick the same token it would for the same logits and
options, so they follow vLLM's order and definitions: a logit bias first (added as is), then the
repetition penalty, over every
token of the prompt or the output (positive logits divided by it, negative ones multiplied, as
transformers does too), then OpenAI's frequency and presence penalties over the output tokens only.
All of them act before the greedy argmax and before temperature. The loop guard (:mod:`steerserve.loop_guard`)
overrides them all: once the answer loops, the end-of-sequence token is the only choice.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from steerserve.loop_guard import LoopWatch
    from steerserve.server.engines.base import SamplingOptions
    from steerserve.server.engines.hf_scheduler import Sequence


def apply_penalties(logits: torch.Tensor, prompt_ids: Seq[int], output_ids: Seq[int],
                    options: SamplingOptions) -> None:
    """Penalise one row of float32 ``logits`` in place (ids past the row's width are ignored)."""
    vocab = logits.shape[-1]
    if options.repetition_penalty != 1.0:
        ids = torch.tensor([*prompt_ids, *output_ids], dtype=torch.long)
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[ids[ids < vocab]] = True
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / options.repetition_penalty,
                                   picked * options.repetition_penalty)
    if output_ids and (options.frequency_penalty or options.presence_penalty):
        ids = torch.tensor(output_ids, dtype=torch.long)
        counts = torch.bincount(ids[ids < vocab], minlength=vocab).to(logits.dtype)
        logits -= options.frequency_penalty * counts + options.presence_penalty * (counts > 0).to(logits.dtype)


def adjust_logits(logits: torch.Tensor, prompt_ids: Seq[int], output_ids: Seq[int],
                  options: SamplingOptions, eos_ids: Iterable[int] = (), loop_watch: LoopWatch | None = None) -> None:
    """One row of float32 ``logits`` biased (the verbosity slider's end push with the bias), then penalised, in
    place (vLLM's order); the end-of-sequence tokens masked while the output is shorter than ``min_tokens`` (as
    vLLM's min-tokens processor does), and made the only choice once ``loop_watch`` sees the answer loop."""
    if len(output_ids) < options.min_tokens and not options.ignore_eos:
        logits[[i for i in eos_ids if i < logits.shape[-1]]] = float("-inf")
    elif loop_watch is not None and not options.ignore_eos and loop_watch.feed(output_ids):
        if ends := [i for i in eos_ids if i < logits.shape[-1]]:
            logits.fill_(float("-inf"))
            logits[ends] = 0.0
            return
    bias = options.total_logit_bias
    if bias is not None and bias.ids:
        ids, values = bias.tensors
        keep = ids < logits.shape[-1]
        logits[ids[keep]] += values[keep]
    push = options.end_push
    if push is not None and push.guide.at_sentence_end(output_ids):
        logits[[i for i in push.guide.end_ids if i < logits.shape[-1]]] += push.logits
    if options.penalized:
        apply_penalties(logits, prompt_ids, output_ids, options)


def sample_tokens(logits: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
    """One token per row of float32 ``logits`` (biased and penalised in place first, where asked): greedy at
    temperature 0, else top-p with the row's generator."""
    for row, seq in enumerate(seqs):
        if seq.options.adjusts_logits:
            adjust_logits(logits[row], seq.prompt_ids, seq.output_ids, seq.options, seq.eos_ids, seq.loop_watch)
    greedy = logits.argmax(-1).tolist()
    tokens = []
    for row, seq in enumerate(seqs):
        opts = seq.options
        if opts.greedy:
            tokens.append(greedy[row])
            continue
        probs = torch.softmax(logits[row] / opts.temperature, dim=-1)
        if opts.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True, stable=True)
            keep = (sorted_p.cumsum(-1) - sorted_p) < opts.top_p
            keep[0] = True  # the top token always survives, even a top_p that rounds to 0 in float32
            choice = torch.multinomial(sorted_p * keep, 1, generator=seq.generator)
            tokens.append(int(order[choice]))
        else:
            tokens.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    return tokens
