"""The batcher: a queue and a worker thread per model around the pure policy.

``ModelWorker.submit`` checks admission (queue limit, shutdown, a deadline
that cannot be met) and queues a request; the worker thread asks
:func:`~deepseek.serving.policy.next_batch` what to do, runs batches on the
engine (which releases the GIL inside PyTorch kernels), splits the outputs
and answers every request exactly once through its callback.

Lock precondition: ``_queue``, ``_draining`` and ``_busy_until`` are read and
written only with ``_cv`` held; the engine runs with it released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from deepseek.serving.policy import (
    BatchConfig,
    LatencyModel,
    Pending,
    bucket_key,
    bucket_length,
    next_batch,
)
from deepseek.serving.protocol import ModelSignature

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """The answer to one request. ``status``: ``ok``, ``deadline_refused``, ``unavailable``
    or ``error``; for ``ok``, ``outputs`` are the model's flat outputs for this request."""

    status: str
    outputs: list[torch.Tensor] | None = None
    message: str = ""
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_rows: int = 0
    late: bool = False


class Rejected(Exception):
    """Refused at admission: HTTP ``status``, metrics ``outcome``, message for the client."""

    def __init__(self, status: int, outcome: str, message: str):
        super().__init__(message)
        self.status, self.outcome, self.message = status, outcome, message


class _Job:
    """A request's data and its one-shot answer callback."""

    __slots__ = ("_answered", "env", "on_done", "tensors")
    _lock = threading.Lock()

    def __init__(self, tensors: list[torch.Tensor], env: dict, on_done: Callable[[Outcome], None]):
        self.tensors, self.env, self.on_done, self._answered = tensors, env, on_done, False

    def answer(self, outcome: Outcome) -> None:
        with _Job._lock:
            if self._answered:  # a bug if it happens: never answer twice
                log.error("request answered twice; second answer (%s) dropped", outcome.status)
                return
            self._answered = True
        try:
            self.on_done(outcome)
        except Exception:  # a broken callback must not take the worker down
            log.exception("answer callback failed")


class ModelWorker:
    """One model's queue and worker thread.

    Example::

        w = ModelWorker(engine, sig, BatchConfig(max_batch_size=32), queue_limit=256)
        w.start()
        w.submit("r1", tensors, rows=1, env={}, on_done=print, deadline_ms=50)
        ...
        w.stop()                     # drains what is queued, then joins
    """

    def __init__(self, engine, sig: ModelSignature, config: BatchConfig, queue_limit: int = 256,
                 metrics=None, clock: Callable[[], float] = time.monotonic, warmup: bool = True):
        self.engine, self.sig, self.config = engine, sig, config
        self.queue_limit = queue_limit
        self.metrics = metrics
        self.clock = clock
        self.latency = LatencyModel()
        self._warmup = warmup
        self._queue: list[Pending] = []
        self._cv = threading.Condition()
        self._draining = False
        self._busy_until = 0.0
        self._ran: set = set()  # (rows, bucket) shapes run once: their plans exist
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"deepseek-batcher-{sig.name}",
                                        daemon=True)
        if metrics is not None:
            metrics.add_model(sig.name, lambda: len(self._queue))

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._draining

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def begin_drain(self) -> None:
        """Refuse new requests (503) and run what is queued without waiting for more."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the queue, stop the thread; answer leftovers ``unavailable`` on timeout."""
        self.begin_drain()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cv:
            left, self._queue = self._queue, []
        for p in left:
            self._refuse(p, "unavailable", "the server stopped before this request ran")

    # --- admission -----------------------------------------------------------
    def submit(self, request_id: str, tensors: list[torch.Tensor], rows: int, env: dict,
               on_done: Callable[[Outcome], None], deadline_ms: float | None = None,
               priority: int = 0, arrival: float | None = None) -> Pending:
        """Queue a request; raise :class:`Rejected` if it is refused at once."""
        now = self.clock()
        arrival = now if arrival is None else arrival
        sig = self.sig
        skip = 1 if sig.batch_symbol else 0
        key = bucket_key([list(t.shape[skip:]) for t in tensors], sig.dim_symbols(), sig.padded)
        deadline = arrival + deadline_ms / 1000.0 if deadline_ms is not None else None
        p = Pending(request_id, arrival, rows, deadline, priority, key,
                    _Job(tensors, env, on_done))
        with self._cv:
            if self._draining:
                raise Rejected(503, "unavailable", f"model {sig.name!r} is shutting down; "
                                                   "retry on another replica")
            if len(self._queue) >= self.queue_limit:
                raise Rejected(429, "queue_full", f"model {sig.name!r} has {len(self._queue)} "
                                                  f"requests queued (limit {self.queue_limit}); "
                                                  "retry later")
            if deadline is not None and self.config.deadline_aware:  # hopeless: refuse now
                start = max(now, self._busy_until)
                need = self.latency.best_latency(self.config.executed_size(rows), key)
                if start + need > deadline:
                    raise Rejected(504, "deadline_refused", self._deadline_text(
                        deadline - now, start - now + need))
            self._queue.append(p)
            self._cv.notify()
        return p

    def _cost(self, rows: int, bucket) -> float:
        return self.latency.estimate_latency(self.config.executed_size(rows), bucket) * \
            self.config.safety

    @staticmethod
    def _deadline_text(left: float, need: float) -> str:
        return (f"deadline cannot be met: {max(left, 0) * 1e3:.1f} ms left, the earliest answer "
                f"is estimated in {need * 1e3:.1f} ms; refused early without running")

    def _refuse(self, p: Pending, status: str, message: str) -> None:
        p.payload.answer(Outcome(status, message=message, queue_s=self.clock() - p.arrival))

    # --- the worker thread ---------------------------------------------------
    def _loop(self) -> None:
        if self._warmup:
            try:
                self._warm()
            except Exception:
                log.exception("warm-up of %s failed; latency will be learned from traffic",
                              self.sig.name)
        self._ready.set()
        while True:
            with self._cv:
                while True:
                    now = self.clock()
                    d = next_batch(self._queue, now, self.config, self.latency.estimate_latency,
                                   drain=self._draining, best=self.latency.best_latency)
                    if d.take or d.refuse:
                        gone = {id(p) for p in d.take} | {id(p) for p in d.refuse}
                        self._queue = [p for p in self._queue if id(p) not in gone]
                        if d.take:
                            self._busy_until = now + self._cost(sum(p.rows for p in d.take),
                                                                d.take[0].bucket)
                        break
                    if self._draining and not self._queue:
                        return
                    self._cv.wait(None if d.wait_until is None else max(0.0, d.wait_until - now))
            for p in d.refuse:
                if self.metrics:
                    self.metrics.refusal(self.sig.name, "deadline")
                self._refuse(p, "deadline_refused", self._deadline_text(
                    p.deadline - now, self.latency.best_latency(
                        self.config.executed_size(p.rows), p.bucket)))
            if d.take:
                self._run(d.take)

    def _run(self, batch: Sequence[Pending]) -> None:
        start = self.clock()
        rows = sum(p.rows for p in batch)
        executed = self.config.executed_size(rows) if self.sig.batch_symbol else 1
        try:
            inputs = self._collate(batch, executed)
            t0 = self.clock()
            outs = self.engine.run_flat(inputs)
            t1 = self.clock()
            if self.sig.batch_symbol and any(o.shape[0] != executed for o in outs):
                raise RuntimeError(f"the engine returned {[tuple(o.shape) for o in outs]} for a "
                                   f"batch of {executed} rows")
            results = self._split(batch, outs)
        except Exception as e:  # every waiting caller learns of it
            log.exception("batch of %d requests failed on %s", len(batch), self.sig.name)
            for p in batch:
                p.payload.answer(Outcome("error", message=f"model {self.sig.name!r} failed on "
                                                          f"this batch: {e}",
                                         queue_s=start - p.arrival, batch_rows=executed))
            return
        shape = (executed, batch[0].bucket)
        if shape in self._ran:
            self.latency.observe(executed, t1 - t0, batch[0].bucket)
        else:  # a shape's first call also builds its plan: learning from it would refuse
            self._ran.add(shape)  # every later request whose deadline is shorter than that
        if self.metrics:
            self.metrics.batch_ran(self.sig.name, executed, t0, t1)
        done = self.clock()
        for p, outputs in zip(batch, results):
            late = p.deadline is not None and done > p.deadline
            p.payload.answer(Outcome("ok", outputs, queue_s=start - p.arrival,
                                     compute_s=t1 - t0, batch_rows=executed, late=late))

    def _collate(self, batch: Sequence[Pending], executed: int) -> list[torch.Tensor]:
        """One tensor per input: requests stacked on dim 0, padded with zeros to the
        bucket's lengths (masks padded with zeros mark the padding) and batch size."""
        if not self.sig.batch_symbol:
            return list(batch[0].payload.tensors)
        out = []
        for i, shape in enumerate(batch[0].bucket):
            first = batch[0].payload.tensors[i]
            if len(batch) == 1 and executed == first.shape[0] and tuple(first.shape[1:]) == shape:
                out.append(first)
                continue
            full = torch.zeros((executed, *shape), dtype=first.dtype)  # (B, *bucket)
            r0 = 0
            for p in batch:
                t = p.payload.tensors[i]
                full[(slice(r0, r0 + p.rows), *(slice(0, n) for n in t.shape[1:]))] = t
                r0 += p.rows
            out.append(full)
        return out

    def _split(self, batch: Sequence[Pending], outs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each request's rows of every output, cut back to its own lengths (copies: the
        engine may reuse its output buffers on the next batch)."""
        if not self.sig.batch_symbol:
            return [[o.clone() for o in outs]]
        results, r0 = [], 0
        padded = self.sig.padded
        for p in batch:
            mine = []
            for info, o in zip(self.sig.outputs, outs):
                index = [slice(r0, r0 + p.rows)]
                for d in info.shape[1:]:
                    s = getattr(d, "expr", None)
                    index.append(slice(0, p.payload.env[s]) if s in padded else slice(None))
                mine.append(o[tuple(index)].clone())
            results.append(mine)
            r0 += p.rows
        return results

    def _warm(self) -> None:
        """Run each batch size the policy will use (four times), to build the engine's
        plans and seed the latency model before the model reports ready."""
        sig = self.sig
        skip = 1 if sig.batch_symbol else 0
        shapes = []
        for info in sig.inputs:
            dims = []
            for d in info.shape[skip:]:
                s = getattr(d, "expr", None)
                if isinstance(d, int):
                    dims.append(d)
                elif s in sig.padded:
                    dims.append(bucket_length(1, sig.padded[s]))
                else:
                    return  # a free symbolic size: learn from traffic instead
            shapes.append(dims)
        sizes = {1}
        if sig.batch_symbol:
            sizes |= {self.config.executed_size(n) for n in
                      (1, *self.config.preferred_batch_sizes, self.config.max_batch_size)}
            sizes |= set(self.config.batch_buckets)
        key = tuple(tuple(s) for s in shapes)
        for n in sorted(sizes):
            inputs = [torch.zeros(((n,) if skip else ()) + tuple(s), dtype=info.dtype)
                      for s, info in zip(shapes, sig.inputs)]
            self.engine.run_flat(inputs)  # the first call of a shape builds its plan
            times = []
            for _ in range(3):
                t0 = self.clock()
                self.engine.run_flat(inputs)
                times.append(self.clock() - t0)
            self.latency.observe(n, sorted(times)[1], key)  # the median resists noise
        log.info("%s latency (s) by batch size: %s", sig.name, self.latency.table())
