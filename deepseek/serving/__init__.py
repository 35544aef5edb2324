"""Serving: deadline-aware dynamic batching behind a KServe v2 HTTP server.

- :mod:`~deepseek.serving.policy`: the pure batching decision ``next_batch`` and the
  online latency model (no threads, no I/O)
- :mod:`~deepseek.serving.batcher`: a queue and a worker thread per model
- :mod:`~deepseek.serving.protocol`: KServe v2 requests/responses (JSON and binary)
- :mod:`~deepseek.serving.server`: FastAPI/uvicorn routes, auth, limits, drain
- :mod:`~deepseek.serving.metrics`: Prometheus metrics
- :mod:`~deepseek.serving.loadgen`: open-loop Poisson load generator

This package imports no web framework itself; the server modules need
``pip install 'deepseek[serve]'``. See docs/serving.md.
"""

from deepseek.serving.policy import BatchConfig, Decision, LatencyModel, Pending, next_batch

__all__ = ["BatchConfig", "Decision", "LatencyModel", "Pending", "next_batch"]
