"""When each request is sent: open-loop Poisson (or gamma, for burstiness) arrivals, as ``vllm bench serve``.

    delays = arrival_times(100, request_rate=4.0, burstiness=1.0, seed=0)   # seconds after the start

``burstiness`` is the gamma shape: 1 is Poisson; below 1 the arrivals bunch up,
above 1 they become more even. The mean rate stays ``request_rate`` either way.
An infinite rate sends everything at once (then ``--concurrency`` is the only limit).
"""

from __future__ import annotations

import math
import random


def arrival_times(count: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of ``count`` requests; seeded, so variants and reruns see the same schedule."""
    if request_rate <= 0:
        raise ValueError("--request-rate must be positive (or inf)")
    if burstiness <= 0:
        raise ValueError("--burstiness must be positive")
    if math.isinf(request_rate):
        return [0.0] * count
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)  # gamma mean = shape * scale = 1 / rate
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.gammavariate(burstiness, scale)
    return times
