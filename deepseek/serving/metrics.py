"""Prometheus metrics of a server (one registry per server, so servers don't mix).

Names (all labelled by ``model``):

- ``deepseek_requests_total{outcome}``: every answered infer request, once, by outcome
  (``ok``, ``deadline_refused``, ``queue_full``, ``unavailable``, ``bad_request``,
  ``unauthorized``, ``error``; ``model="_unknown"`` for a model name the server does not
  have)
- ``deepseek_request_queue_seconds``, ``deepseek_request_compute_seconds``,
  ``deepseek_request_total_seconds``: latency histograms of served requests
- ``deepseek_batch_size``: executed batch sizes (rows, after padding)
- ``deepseek_deadline_misses_total``: requests served after their deadline
- ``deepseek_refused_total{reason}``: requests refused before running
  (``deadline``, ``queue_full``, ``draining``)
- ``deepseek_device_busy_seconds_total``: time the device executed batches;
  ``rate()`` of it is the busy fraction
- ``deepseek_device_busy_fraction``: the same over the last 10 seconds
- ``deepseek_queue_depth``: requests waiting now
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the server)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
OUTCOMES = ("ok", "deadline_refused", "queue_full", "unavailable", "bad_request", "unauthorized",
            "error")


class BusyWindow:
    """Share of the last ``window`` seconds covered by busy intervals (thread-safe)."""

    def __init__(self, window: float = 10.0, clock=time.monotonic):
        self.window = window
        self.clock = clock
        self._spans: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._spans.append((start, end))

    def fraction(self) -> float:
        now = self.clock()
        lo = now - self.window
        with self._lock:
            while self._spans and self._spans[0][1] < lo:
                self._spans.popleft()
            busy = sum(min(e, now) - max(s, lo) for s, e in self._spans if e > lo)
        return max(0.0, min(1.0, busy / self.window))


class ServingMetrics:
    """The metrics of one server, in a registry of its own."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("deepseek_requests", "Answered infer requests by outcome",
                                ["model", "outcome"], registry=r)
        self.queue_seconds = Histogram("deepseek_request_queue_seconds",
                                       "Time from arrival to the start of the request's batch",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("deepseek_request_compute_seconds",
                                         "Execution time of the request's batch",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.total_seconds = Histogram("deepseek_request_total_seconds",
                                       "Time from arrival to the answer (served requests)",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("deepseek_batch_size", "Executed batch sizes (rows)",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.deadline_misses = Counter("deepseek_deadline_misses",
                                       "Requests served after their deadline", ["model"],
                                       registry=r)
        self.refused = Counter("deepseek_refused", "Requests refused before running",
                               ["model", "reason"], registry=r)
        self.busy_seconds = Counter("deepseek_device_busy_seconds",
                                    "Seconds the device spent executing batches", ["model"],
                                    registry=r)
        self._busy_fraction = Gauge("deepseek_device_busy_fraction",
                                    "Share of the last 10 s the device executed batches",
                                    ["model"], registry=r)
        self._queue_depth = Gauge("deepseek_queue_depth", "Requests waiting", ["model"],
                                  registry=r)
        self._windows: dict[str, BusyWindow] = {}

    def add_model(self, model: str, queue_depth) -> None:
        """Start the series of ``model``; ``queue_depth()`` is read at each scrape."""
        w = self._windows[model] = BusyWindow()
        self._busy_fraction.labels(model).set_function(w.fraction)
        self._queue_depth.labels(model).set_function(queue_depth)
        for o in OUTCOMES:
            self.requests.labels(model, o)
        self.deadline_misses.labels(model)
        self.busy_seconds.labels(model)

    def batch_ran(self, model: str, rows: int, start: float, end: float) -> None:
        self.batch_size.labels(model).observe(rows)
        self.busy_seconds.labels(model).inc(end - start)
        self._windows[model].add(start, end)

    def served(self, model: str, queue_s: float, compute_s: float, total_s: float,
               late: bool) -> None:
        self.queue_seconds.labels(model).observe(queue_s)
        self.compute_seconds.labels(model).observe(compute_s)
        self.total_seconds.labels(model).observe(total_s)
        if late:
            self.deadline_misses.labels(model).inc()

    def answered(self, model: str, outcome: str) -> None:
        self.requests.labels(model, outcome).inc()

    def refusal(self, model: str, reason: str) -> None:
        self.refused.labels(model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
