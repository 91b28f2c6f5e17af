"""Mirrored preference pairs share a batch: found in the trainer's own tokenized data, shuffled as blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from training_helpers import FAST, run_recipe

from steerserve.training.config import ConfigError, load_config
from steerserve.training.dpo import CONFIG
from steerserve.training.mirrored_batches import MirroredPairSampler, mirrored_groups


def test_groups_pair_each_row_with_its_mirror_once() -> None:
    chosen = [[1, 1], [2], [1, 1], [3], [2, 2], [1], [5, 6]]
    rejected = [[2, 2], [1, 1, 1], [2], [4], [1], [2], [6, 6]]
    # rows 0/1 mirror (1's rejected reply cut longer); 2 mirrors 4 (1 is taken); 5 has none left;
    # 3 and 6 never had one. key_tokens=1: bucketed by the first token (in real data cut copies differ only
    # past the first KEY_TOKENS)
    assert mirrored_groups(chosen, rejected, key_tokens=1) == [[0, 1], [2, 4], [3], [5], [6]]
    # a reply and its mirror must agree on every shared token
    assert mirrored_groups([[5, 6], [6, 8]], [[6, 7], [5, 6]], key_tokens=1) == [[0], [1]]


def test_sampler_keeps_blocks_whole_and_replays_an_epoch() -> None:
    sampler = MirroredPairSampler([[0, 1], [2, 4], [3], [5], [6]], seed=0)  # 3 singles: one left out
    order = list(sampler)
    assert len(order) == len(sampler) == 6 and len(set(order)) == 6
    blocks = {frozenset(order[k:k + 2]) for k in range(0, len(order), 2)}
    assert {frozenset({0, 1}), frozenset({2, 4})} <= blocks
    assert list(sampler) == order  # same epoch, same order: a resumed run skips the batches it trained on
    orders = set()
    for epoch in range(8):
        sampler.set_epoch(epoch)
        orders.add(tuple(sampler))
    assert len(orders) > 1


def test_odd_batch_size_is_refused() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(CONFIG, None, ["model=tiny", "data=x.jsonl", "data_format=helpsteer-sliders",
                                      "mirrored_batches=true", "batch_size=3"])


@pytest.mark.slow
def test_dpo_trains_on_slider_pairs_in_mirrored_batches(tmp_path: Path, tiny_model_dir: Path,
                                                       attribute_file: Path) -> None:
    """A real TRL run: the loader it trains from puts every mirrored pair at positions 2k, 2k+1."""
    from transformers import TrainerCallback

    seen: dict[str, Any] = {}

    class RecordOrder(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                           **kwargs: Any) -> None:
            sampler = train_dataloader.batch_sampler.sampler
            seen.update(sampler=sampler, order=list(sampler), dataset=train_dataloader.dataset)

    out = run_recipe("dpo", tmp_path / "dpo-mirrored", [
        f"model={tiny_model_dir}", f"data={attribute_file}", "data_format=helpsteer-sliders", "steering=described",
        "mirrored_batches=true", *FAST, "max_length=320"], callbacks=(RecordOrder(),))  # room for both twins' prompts
    assert (out / "manifest.json").is_file()
    assert isinstance(seen["sampler"], MirroredPairSampler)
    dataset, order = seen["dataset"], seen["order"]
    twins = [group for group in mirrored_groups(dataset["chosen_ids"], dataset["rejected_ids"]) if len(group) == 2]
    assert len(twins) >= 4 and 2 * len(twins) <= len(dataset)
    position = {index: k for k, index in enumerate(order)}
    for first, second in twins:
        assert position[first] // 2 == position[second] // 2  # positions 2k and 2k+1: one batch of any even size
        assert dataset[first]["chosen_ids"] == dataset[second]["rejected_ids"]
