"""Batches that keep mirrored preference pairs together, for attribute-conditioned DPO.

``helpsteer-sliders`` turns two replies to one prompt into two pairs that are mirror images: reply A chosen
over B under A's attribute line, B over A under B's. Only the line tells them apart. Shuffled one by one, the
two halves of a contrast almost never share a batch, and each step moves the model the same way whatever the
line says (measured on the default model: every verbosity level got shorter, held-out reward accuracy 0.25,
``benchmarks/results/steerability-dpo-sliders``). In one batch, the parts of their gradients that ignore the
line pull in opposite directions and cancel; what is left is what the line changes.

The sampler finds mirrors in the trainer's tokenized dataset (``chosen_ids`` of one == ``rejected_ids`` of the
other), so rows dropped on the way (over-long prompts) cannot misalign it. Unmirrored rows are paired among
themselves so that every mirror starts at an even position and an even batch never splits one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

logger = logging.getLogger(__name__)

KEY_TOKENS = 16  # replies are bucketed by their first tokens before the prefix comparison


def mirrored_groups(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                    key_tokens: int = KEY_TOKENS) -> list[list[int]]:
    """Index groups in dataset order: ``[i, j]`` for a mirrored pair of rows, ``[i]`` for a row without one.

    Row j mirrors row i when j's chosen reply is i's rejected one and the other way round; a reply counts as
    the same when one token list is a prefix of the other (a trainer may cut the two copies at different
    lengths, their prompts being different lengths).
    """
    buckets: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for index, (chosen_ids, rejected_ids) in enumerate(zip(chosen, rejected)):
        buckets.setdefault((tuple(chosen_ids[:key_tokens]), tuple(rejected_ids[:key_tokens])), []).append(index)
    groups, taken = [], set()
    for index, (chosen_ids, rejected_ids) in enumerate(zip(chosen, rejected)):
        if index in taken:
            continue
        taken.add(index)
        mirror = next((j for j in buckets.get((tuple(rejected_ids[:key_tokens]), tuple(chosen_ids[:key_tokens])), [])
                       if j not in taken and _same_reply(chosen_ids, rejected[j])
                       and _same_reply(rejected_ids, chosen[j])), None)
        if mirror is not None:
            taken.add(mirror)
        groups.append([index] if mirror is None else [index, mirror])
    return groups


def _same_reply(a: Sequence[int], b: Sequence[int]) -> bool:
    shorter = min(len(a), len(b))
    return shorter > 0 and list(a[:shorter]) == list(b[:shorter])


class MirroredPairSampler:
    """Shuffled indices in which each mirrored pair of rows sits at positions 2k, 2k+1 (a torch Sampler).

    Deterministic per (seed, epoch), so a resumed run skips exactly the batches it already trained on.
    """

    def __init__(self, groups: list[list[int]], seed: int) -> None:
        twins = [group for group in groups if len(group) == 2]
        singles = [group[0] for group in groups if len(group) == 1]
        if len(singles) % 2:
            logger.info("one row without a mirror left out of each epoch (odd count): row %d", singles[-1])
        self.blocks = twins + [singles[i:i + 2] for i in range(0, len(singles) - 1, 2)]
        self.seed, self.epoch = seed, 0
        logger.info("mirrored batching: %d mirrored pairs, %d rows without a mirror", len(twins), len(singles))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = list(self.blocks)
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return (index for block in order for index in block)

    def __len__(self) -> int:
        return 2 * len(self.blocks)


def mirrored_trainer_class(trainer_class: type) -> type:
    """``trainer_class`` (TRL's DPOTrainer) with its training sampler replaced by :class:`MirroredPairSampler`."""

    class MirroredBatchesTrainer(trainer_class):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202 - transformers' signature
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            groups = mirrored_groups(dataset["chosen_ids"], dataset["rejected_ids"])
            return MirroredPairSampler(groups, self.args.seed)

    return MirroredBatchesTrainer
