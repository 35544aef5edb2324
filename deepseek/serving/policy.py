"""The batching policy: one pure function, ``next_batch(queue, now, config, estimate)``.

It decides, from the queued requests' deadlines, priorities and shapes, which
requests run next as one batch, which are refused because their deadline can
no longer be met, and, if it is better to wait for more requests, until when.
It reads no clock, takes no lock and keeps no state: threads wrap it
(:mod:`deepseek.serving.batcher`), tests call it directly.

Also here, pure as well: the latency model learned online
(:class:`LatencyModel`, the article's ``estimate_latency``) and the bucketing
of variable-length inputs (:func:`bucket_length`, :func:`bucket_key`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# estimate(executed_batch_size, bucket) -> seconds of compute for one batch
Estimate = Callable[[int, Hashable], float]


@dataclass(eq=False)
class Pending:
    """A queued request as the policy sees it (compared by identity).

    ``priority`` follows Triton: 1 is the most urgent level, 2 the next, and so
    on; 0 (the default) ranks after every explicit level. ``deadline`` is an
    absolute time on the batcher's clock (seconds), or None for no deadline.
    """

    id: str
    arrival: float
    rows: int = 1
    deadline: float | None = None
    priority: int = 0
    bucket: Hashable = ()
    payload: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class BatchConfig:
    """How batches are formed for one model.

    ``batch_buckets``: if given, a batch of ``n`` rows is padded up to the
    smallest bucket >= n before it runs (the engine then only sees those batch
    sizes, e.g. one CUDA graph or one tuned plan each); ``safety`` scales the
    latency estimates to leave headroom for noise; ``margin`` (seconds) is kept
    free before every deadline when batches are grown or waited for, for the
    worker's wake-up and sending the answer (refusal uses the deadline itself).
    """

    max_batch_size: int = 64
    max_queue_delay: float = 0.005
    preferred_batch_sizes: tuple[int, ...] = ()
    batch_buckets: tuple[int, ...] = ()
    safety: float = 1.2
    margin: float = 0.002
    deadline_aware: bool = True  # False: the fixed-delay baseline (see fixed_delay_batch)

    def executed_size(self, rows: int) -> int:
        """The batch size the engine runs for ``rows`` rows (after batch-bucket padding)."""
        for b in sorted(self.batch_buckets):
            if b >= rows:
                return b
        return rows


@dataclass(frozen=True)
class Decision:
    """What to do now: run ``take`` as one batch, answer ``refuse`` with a deadline
    refusal, and (if nothing is taken) sleep until ``wait_until`` or the next arrival.
    ``wait_until`` is None when there is nothing to wait for (empty queue)."""

    take: tuple[Pending, ...] = ()
    refuse: tuple[Pending, ...] = ()
    wait_until: float | None = None


def urgency(r: Pending) -> tuple:
    """Sort key, most urgent first: priority level, then earliest deadline, then arrival."""
    level = r.priority if r.priority > 0 else math.inf
    return (level, r.deadline if r.deadline is not None else math.inf, r.arrival)


def next_batch(queue: Sequence[Pending], now: float, config: BatchConfig, estimate: Estimate,
               drain: bool = False, best: Estimate | None = None) -> Decision:
    """Decide the next batch for a queue (a pure function of its arguments).

    Call it when the device is free (``now``) and after every arrival.
    ``estimate(size, bucket)`` is the expected compute time of one batch of
    ``size`` executed rows, used to form batches and to time the wait;
    ``best(size, bucket)`` (default: ``estimate``) is the fastest time seen,
    used to refuse: a request is refused only if it would miss its deadline
    even at that speed, so a passing slowdown that inflates the average
    cannot make the server refuse everything (and so never measure again);
    ``drain=True`` (shutdown) runs what is queued without waiting for more.

    Example::

        d = next_batch(queue, time.monotonic(), BatchConfig(max_batch_size=32),
                       latency.estimate_latency)
        if d.take: run(d.take)
    """
    if not config.deadline_aware:
        return fixed_delay_batch(queue, now, config, drain)

    def cost(rows: int, bucket: Hashable) -> float:
        return estimate(config.executed_size(rows), bucket) * config.safety

    fastest = best or estimate
    # Early refusal: a request that would miss its deadline even if it ran alone right
    # now, at the best speed seen, cannot be helped; answering at once beats wasting
    # the device on it.
    refuse = tuple(r for r in queue if r.deadline is not None
                   and now + fastest(config.executed_size(r.rows), r.bucket) > r.deadline)
    live = sorted((r for r in queue if r not in refuse), key=urgency) if refuse else \
        sorted(queue, key=urgency)
    if not live:
        return Decision(refuse=refuse)
    head = live[0]
    # Only requests of the head's bucket (same padded shapes) can share its batch.
    group = [r for r in live if r.bucket == head.bucket]
    # Latest start of each request if it ran alone: the batch must not push any
    # queued request (taken or not) past it.
    margin = config.margin
    alone = sorted((r.deadline - margin - cost(r.rows, r.bucket), id(r)) for r in live
                    if r.deadline is not None)

    def left_behind_start(taken: set[int]) -> float:
        # the earliest latest-start among queued requests not in ``taken``
        return next((t for t, i in alone if i not in taken), math.inf)

    # Grow the batch in urgency order; skip a request that would make a member or a
    # request left behind miss its deadline (the head is always taken).
    # batch_deadline: when the batch must be done (the earliest member deadline, less margin)
    batch, rows = [head], head.rows
    batch_deadline = head.deadline - margin if head.deadline is not None else math.inf
    for r in group[1:]:
        if rows + r.rows > config.max_batch_size:
            continue
        new_rows = rows + r.rows
        finish = now + cost(new_rows, head.bucket)
        members_deadline = min(batch_deadline,
                               r.deadline - margin if r.deadline is not None else math.inf)
        if finish > members_deadline:
            continue
        # left behind: must still be able to start after this batch finishes
        if finish > left_behind_start({id(x) for x in batch} | {id(r)}):
            continue
        batch.append(r)
        rows, batch_deadline = new_rows, members_deadline

    # Full batch, or draining at shutdown: run now.
    if rows >= config.max_batch_size or drain:
        return Decision(take=tuple(batch), refuse=refuse)
    # A preferred batch size can be formed: run the largest one now (Triton's rule).
    cut = _preferred_cut(batch, rows, config)
    if cut:
        return Decision(take=cut, refuse=refuse)
    # Otherwise wait for more requests, but not past the max queue delay of the oldest
    # request in the group, nor past the last moment at which a batch one row larger
    # would still meet every queued deadline.
    oldest = min(r.arrival for r in group)
    grown = max(cost(rows, head.bucket), cost(min(rows + 1, config.max_batch_size), head.bucket))
    latest = min(batch_deadline, left_behind_start({id(x) for x in batch})) - grown
    wait_until = min(oldest + config.max_queue_delay, latest)
    if wait_until <= now:
        # No time left to wait: run the batch we have.
        return Decision(take=tuple(batch), refuse=refuse)
    return Decision(refuse=refuse, wait_until=wait_until)


def _preferred_cut(batch: list[Pending], rows: int, config: BatchConfig) -> tuple[Pending, ...]:
    """The batch cut to the largest preferred size it can form exactly, or ()."""
    formable = [p for p in config.preferred_batch_sizes if p <= rows]
    if formable:
        p, cut, acc = max(formable), [], 0
        for r in batch:
            if acc + r.rows <= p:
                cut.append(r)
                acc += r.rows
        if acc == p:
            return tuple(cut)
    return ()


def fixed_delay_batch(queue: Sequence[Pending], now: float, config: BatchConfig,
                      drain: bool = False) -> Decision:
    """The baseline policy, as Triton's dynamic batcher does it: requests in priority,
    then arrival order; a batch runs when it is full, reaches a preferred size, or its
    oldest request has waited the max queue delay; deadlines are only checked when a
    request leaves the queue (an expired one is refused then). ``deepseek serve
    --batching fixed`` selects it, to compare against the deadline-aware policy."""
    refuse = tuple(r for r in queue if r.deadline is not None and now > r.deadline)
    live = sorted((r for r in queue if r not in refuse),
                  key=lambda r: (r.priority if r.priority > 0 else math.inf, r.arrival))
    if not live:
        return Decision(refuse=refuse)
    head = live[0]
    batch, rows = [], 0
    for r in live:
        if r.bucket == head.bucket and rows + r.rows <= config.max_batch_size:
            batch.append(r)
            rows += r.rows
    if rows >= config.max_batch_size or drain:
        return Decision(take=tuple(batch), refuse=refuse)
    cut = _preferred_cut(batch, rows, config)
    if cut:
        return Decision(take=cut, refuse=refuse)
    wait_until = min(r.arrival for r in batch) + config.max_queue_delay
    if wait_until <= now:
        return Decision(take=tuple(batch), refuse=refuse)
    return Decision(refuse=refuse, wait_until=wait_until)


class LatencyModel:
    """Compute time per batch size, learned online from measured batches.

    ``estimate_latency(size, bucket)``: the moving average measured for that
    (bucket, size) if there is one; else a least-squares line ``a + b * size``
    through the averages of that bucket (or of all buckets if the bucket was
    never seen); ``default`` before any measurement. Estimates are never
    below the smallest measured value. Reads need no lock (one writer thread).

    Example::

        lat = LatencyModel()
        lat.observe(8, 0.0021)
        lat.estimate_latency(16)      # extrapolated from what was measured
    """

    def __init__(self, alpha: float = 0.2, default: float = 0.005):
        self.alpha = alpha
        self.default = default
        self._mean: dict[tuple[Hashable, int], float] = {}
        self._best: dict[tuple[Hashable, int], float] = {}

    def observe(self, size: int, seconds: float, bucket: Hashable = ()) -> None:
        key = (bucket, size)
        old = self._mean.get(key)
        self._mean[key] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds
        self._best[key] = min(seconds, self._best.get(key, seconds))

    def estimate_latency(self, size: int, bucket: Hashable = ()) -> float:
        """Expected seconds for a batch of ``size`` rows (moving average, fitted)."""
        return self._fit(self._mean, size, bucket)

    def best_latency(self, size: int, bucket: Hashable = ()) -> float:
        """The fastest seconds seen for a batch of ``size`` rows (fitted the same way)."""
        return self._fit(self._best, size, bucket)

    def _fit(self, table: dict, size: int, bucket: Hashable) -> float:
        exact = table.get((bucket, size))
        if exact is not None:
            return exact
        points = [(n, t) for (b, n), t in table.items() if b == bucket] or \
                 [(n, t) for (_, n), t in table.items()]
        if not points:
            return self.default
        floor = min(t for _, t in points)
        if len(points) == 1:
            n0, t0 = points[0]
            return max(floor, t0 * size / n0)  # proportional to the rows: pessimistic for growth
        k = len(points)
        mx = sum(n for n, _ in points) / k
        my = sum(t for _, t in points) / k
        var = sum((n - mx) ** 2 for n, _ in points)
        slope = max(0.0, sum((n - mx) * (t - my) for n, t in points) / var) if var else 0.0
        return max(floor, my + slope * (size - mx))

    def table(self) -> dict[str, float]:
        """The measured averages, for logs and metadata: ``{"bucket/size": seconds}``."""
        return {f"{b}/{n}": t for (b, n), t in sorted(self._mean.items(), key=str)}


def bucket_length(n: int, buckets: Sequence[int] = ()) -> int:
    """The padded length of a variable-length dim of size ``n``: the smallest of
    ``buckets`` >= n, or (no buckets given, or n above them all) the next power of
    two >= max(n, 8)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    return max(8, 1 << (n - 1).bit_length())


def bucket_key(shapes: Sequence[Sequence[int]], symbols: Sequence[Sequence[str | None]],
               padded: Mapping[str, Sequence[int]]) -> tuple:
    """The key that requests must share to be batched together.

    ``shapes[i]`` is input i's shape without the batch dim; ``symbols[i][d]`` names
    the symbol of that dim (None for a fixed dim); ``padded`` maps the symbols that
    are padded (with a mask) to their bucket lengths. Padded dims count by bucket,
    every other dim by its exact size.
    """
    key = []
    for shape, syms in zip(shapes, symbols):
        key.append(tuple(bucket_length(n, padded[s]) if s in padded else n
                         for n, s in zip(shape, syms)))
    return tuple(key)
