"""Which process of a multi-process run this is, and how the processes take turns on shared files.

``accelerate launch`` (torchrun underneath) starts one process per GPU, each running the same
recipe; only rank 0 may check, build or commit the output directory. In a single process every
function here is a no-op, so the recipes run unchanged without a launcher::

    with main_process_first():      # rank 0 prepares the work dir and base model; the others then reuse them
        work = run_dir.prepare()
    if is_main_process():
        write_manifest(work)
    wait_for_everyone()
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import PartialState


def world_size() -> int:
    """How many processes run this recipe (``WORLD_SIZE``, set by torchrun / accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def trains_on_cpu() -> bool:
    """Whether the trainer will run on CPU: ``ACCELERATE_USE_CPU`` (``accelerate launch --cpu``) or no CUDA."""
    import torch

    return os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true" or not torch.cuda.is_available()


def is_main_process() -> bool:
    """True on global rank 0, and always in a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """A barrier over all processes (nothing to wait for in a single process)."""
    if world_size() > 1:
        _state().wait_for_everyone()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first; the others run it once rank 0 is through."""
    if not is_main_process():
        wait_for_everyone()
    yield
    if is_main_process():
        wait_for_everyone()


def _state() -> PartialState:
    """accelerate's process state, set up as the Trainer will set it up later (same device and backend).

    The process group starts here, before the Trainer exists, because rank 0 must build the
    base model and check the output before the others load or touch them. The Trainer reuses
    the group; ``ACCELERATE_USE_CPU`` (``accelerate launch --cpu``) or no CUDA means gloo on CPU.
    """
    from accelerate import PartialState  # imported here: only a launcher's several processes need it

    return PartialState(cpu=trains_on_cpu())
