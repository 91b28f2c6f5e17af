"""vLLM scheduler stats -> the engine's gauges: batch, queue, per-adapter counts, KV-cache usage.

vLLM calls a ``StatLoggerBase`` after every engine step with its ``SchedulerStats``; this
one hands a :class:`StepStats` to a callback, so the same gauges (and the same Prometheus
names) come out whichever engine serves a variant::

    loggers = [functools.partial(StepStatLogger, sink=engine.observe_step)]
    AsyncLLM.from_engine_args(args, stat_loggers=loggers)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclasses.dataclass(frozen=True)
class StepStats:
    """What one scheduler step reports: batch and queue (all requests), per LoRA adapter, KV-cache use."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    """Fraction (0-1) of the KV-cache blocks in use."""
    lora_running: dict[str, int] = dataclasses.field(default_factory=dict)
    """Adapter name -> its requests in the batch (included in ``running``)."""
    lora_waiting: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, stats: Any) -> StepStats:
        """From vLLM's ``SchedulerStats`` (getattr throughout: the stat-logger interface is not stable)."""
        waiting = stats.num_waiting_reqs + getattr(stats, "num_skipped_waiting_reqs", 0)
        return cls(
            running=stats.num_running_reqs,
            waiting=waiting,
            kv_cache_usage=float(getattr(stats, "kv_cache_usage", 0.0)),
            lora_running=dict(getattr(stats, "running_lora_adapters", {}) or {}),
            lora_waiting=dict(getattr(stats, "waiting_lora_adapters", {}) or {}),
        )

    @property
    def base_running(self) -> int:
        """Requests on the base weights (no adapter)."""
        return self.running - sum(self.lora_running.values())

    @property
    def base_waiting(self) -> int:
        return self.waiting - sum(self.lora_waiting.values())


class StepStatLogger(StatLoggerBase):
    """Per-engine vLLM stat logger that passes each scheduler step's stats to ``sink``."""

    def __init__(
        self, vllm_config: Any, engine_index: int = 0, *, sink: Callable[[StepStats], None] | None = None
    ) -> None:
        self._sink = sink

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ) -> None:
        if scheduler_stats is not None and self._sink is not None:
            self._sink(StepStats.of(scheduler_stats))

    def log_engine_initialized(self) -> None:
        pass
