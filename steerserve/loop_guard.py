"""Loop guard: an answer that repeats the same stretch of tokens verbatim, over and over, is ended there.

The 135M default model, steered or quantized, sometimes falls into a verbatim loop ("a sound that is both a sound
that is both ..." for 600 tokens) and runs to the token cap. Those answers carry nothing after the second copy, cost
the most decoding, and one of them outweighs the rest of a level in every mean the benchmarks take: a looping
sentence of hundreds of words grades 50 to 250 on the Flesch-Kincaid scale. The guard watches each answer's tail
and, once the last stretch of 1 to :data:`MAX_PERIOD` tokens has come ``repeats`` times in a row and the repeated
run is at least :data:`MIN_LOOP_TOKENS` long, makes the end-of-turn token the only choice for the next step::

    watch = LoopWatch(repeats=4)
    watch.feed(output_ids)        # after every step: True once the answer's tail loops

The test is incremental: for every period p it keeps how many trailing tokens equal the token p before them, so a
step costs :data:`MAX_PERIOD` comparisons per answer, whatever its length. The minimum run keeps short legitimate
repeats untouched: "ha ha ha ha", a table rule ``|---|---|---|``, a number's run of zeros. The transformers and
llama.cpp engines apply it in :func:`steerserve.server.engines.sampling.adjust_logits`, vLLM in its logits
processor (:mod:`steerserve.server.engines.vllm_loop_guard`). This is decoding, not training: the model's own
answers are untouched until they loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import AfterValidator, Field

MAX_PERIOD = 64
"""Longest repeated stretch watched for, in tokens (a looping sentence of about 45 words)."""
MIN_LOOP_TOKENS = 32
"""Shortest repeated run (every copy together) that counts as a loop."""
DEFAULT_LOOP_REPEATS = 4
"""Copies in a row that end an answer, the server's default (0 turns the guard off)."""


def _checked_copies(value: int) -> int:
    if value == 1:
        raise ValueError("loop_guard must be 0 (off) or at least 2 copies in a row")
    return value


LoopCopies = Annotated[int, Field(ge=0, le=64), AfterValidator(_checked_copies)]
"""A ``loop_guard`` setting or request field: 0 (off) or 2 to 64 copies; one copy is no loop (the settings and
the request models report it under the field's name)."""


class LoopWatch:
    """One answer's loop test, fed its growing list of output tokens."""

    def __init__(self, repeats: int = DEFAULT_LOOP_REPEATS) -> None:
        if repeats < 2:
            raise ValueError(f"a loop needs at least 2 copies, got repeats={repeats}")
        self.repeats = repeats
        self._start()

    def _start(self) -> None:
        self.seen = 0
        self.matching = [0] * (MAX_PERIOD + 1)
        """``matching[p]``: trailing tokens that equal the token ``p`` places before them."""
        self.looping = False

    def feed(self, output_ids: Sequence[int]) -> bool:
        """Take the tokens added since the last call; whether the answer's tail is now a loop (and stays one)."""
        if len(output_ids) < self.seen:  # a preempted request starts over
            self._start()
        matching, repeats = self.matching, self.repeats
        for t in range(self.seen, len(output_ids)):
            token = output_ids[t]
            for p in range(1, min(MAX_PERIOD, t) + 1):
                run = matching[p] + 1 if output_ids[t - p] == token else 0
                matching[p] = run
                # A tail of run + p tokens with period p holds (run + p) / p copies of its last p tokens.
                if run >= (repeats - 1) * p and run + p >= MIN_LOOP_TOKENS:
                    self.looping = True
        self.seen = len(output_ids)
        return self.looping
