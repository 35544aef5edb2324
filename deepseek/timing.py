"""Side-by-side timing: contenders interleaved round-robin so drift hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def time_interleaved(contenders: Mapping[str, Callable[[], object]], iters: int = 50,
                     warmup: int = 5, min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each contender, measured in interleaved rounds.

    Each round calls every contender once (in a rotating order); warm-up rounds
    are excluded. Rounds continue past ``iters`` until ``min_seconds`` elapsed.
    """
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < iters or time.perf_counter() - start < min_seconds:
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            contenders[n]()
            samples[n].append(time.perf_counter() - t0)
        r += 1
    return {n: statistics.median(s) for n, s in samples.items()}
