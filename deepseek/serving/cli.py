"""``deepseek serve`` and ``deepseek loadgen`` (registered by ``deepseek.cli``).

Server dependencies (fastapi, uvicorn, prometheus-client, aiohttp, matplotlib)
are imported only when a command runs: ``pip install deepseek[serve]``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from deepseek.errors import DeepseekError

log = logging.getLogger(__name__)

SERVE_EXAMPLE = ("deepseek compile mnist_cnn -o mnist.dsk --dynamic-batch --batch 4\n"
                 "  deepseek serve mnist.dsk --port 8000 --max-batch-size 64 "
                 "--max-queue-delay-ms 5 --preferred-batch-sizes 8,16,32")
LOADGEN_EXAMPLE = ("deepseek loadgen --url http://127.0.0.1:8000 --model mnist "
                   "--rate 100,200,400 --duration 5 --deadline-ms 50 --out loadgen/")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DeepseekError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise DeepseekError(f"sizes must be positive, got {text!r}")
    return values


def _need_serving_deps() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise DeepseekError(f"deepseek serve needs {', '.join(missing)}: "
                            "pip install 'deepseek[serve]'")


def cmd_serve(a) -> int:
    _need_serving_deps()
    import deepseek as ds
    from deepseek.serving.server import ServeConfig, ServingState, serve_forever

    if a.names and len(a.names) != len(a.models):
        raise DeepseekError(f"--name was given {len(a.names)} times for {len(a.models)} models; "
                            "give one name per model or none")
    names = a.names or [Path(m).stem for m in a.models]
    if len(set(names)) != len(names):
        raise DeepseekError(f"two models would share a name ({names}); use --name")
    import torch

    # Leave a core to the HTTP event loop: PyTorch's worker threads spin while they wait,
    # and competing with the loop for every core made batches ~100x slower on 2 cores.
    threads = a.threads or max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))
    torch.set_num_threads(threads)
    token = a.token or os.environ.get("DEEPSEEK_SERVE_TOKEN") or None
    if a.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("serving on %s without a token: anyone who reaches it can run the models",
                    a.host)
    cfg = ServeConfig(host=a.host, port=a.port, max_batch_size=a.max_batch_size,
                      max_queue_delay_ms=a.max_queue_delay_ms,
                      preferred_batch_sizes=_ints(a.preferred_batch_sizes or ""),
                      pad_batch=a.pad_batch, batch_buckets=_ints(a.batch_buckets or ""),
                      length_buckets=_ints(a.length_buckets or ""),
                      queue_limit=a.queue_limit, deadline_margin_ms=a.deadline_margin_ms,
                      deadline_aware=a.batching == "deadline",
                      token=token,
                      max_request_bytes=a.max_request_bytes, drain_timeout_s=a.drain_timeout)
    if any(p > cfg.max_batch_size for p in cfg.preferred_batch_sizes):
        raise DeepseekError(f"--preferred-batch-sizes {a.preferred_batch_sizes} exceed "
                            f"--max-batch-size {cfg.max_batch_size}")
    state = ServingState(cfg)
    for name, path in zip(names, a.models):
        w = state.add_model(name, ds.load(path, backend=a.backend))
        batching = (f"batches up to {cfg.max_batch_size}" if w.sig.batch_symbol
                    else "no symbolic batch dim: one request at a time")
        print(f"model {name!r} from {path}: {batching}", flush=True)

    def announce(url: str) -> None:
        print(f"deepseek serve: listening on {url} (KServe v2 under /v2, metrics at /metrics"
              f"{', bearer token required' if token else ''})", flush=True)

    serve_forever(state, access_log=a.access_log, announce=announce)
    print("deepseek serve: drained and stopped", flush=True)
    return 0


def cmd_loadgen(a) -> int:
    from deepseek.serving.loadgen import format_table, plot, sweep, to_json

    try:
        rates = [float(x) for x in a.rate.split(",") if x.strip()]
    except ValueError:
        raise DeepseekError(f"--rate wants comma-separated numbers, got {a.rate!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise DeepseekError("--rate needs positive rates")
    token = a.token or os.environ.get("DEEPSEEK_SERVE_TOKEN") or None
    try:
        results = sweep(a.url.rstrip("/"), a.model, rates, duration=a.duration,
                        deadline_ms=a.deadline_ms if a.deadline_ms > 0 else None, token=token,
                        length=a.length, seed=a.seed, connections=a.connections)
    except (OSError, RuntimeError) as e:
        raise DeepseekError(f"load generation against {a.url} failed: {e}") from None
    print(format_table(results))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "loadgen.json").write_text(json.dumps(to_json(results), indent=2))
        (out / "loadgen.txt").write_text(format_table(results) + "\n")
        plot(results, str(out / "loadgen.png"),
             title=f"{a.model}: deadline {a.deadline_ms:g} ms, {a.duration:g} s per rate")
        print(f"wrote {out / 'loadgen.png'}, loadgen.json, loadgen.txt")
    bad = sum(r.lost + r.duplicated + r.mismatched for r in results)
    if bad:
        print(f"error: {bad} requests lost, answered twice or mixed up", file=sys.stderr)
    return 1 if bad else 0


def register(command) -> None:
    """Add ``serve`` and ``loadgen`` to the ``deepseek`` command."""
    s = command("serve", cmd_serve, "serve .dsk models over HTTP (KServe v2) with "
                                    "deadline-aware dynamic batching", SERVE_EXAMPLE)
    s.add_argument("models", nargs="+", metavar="MODEL.dsk")
    s.add_argument("--name", action="append", dest="names",
                   help="model name (default: the file's stem); once per model, in order")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed)")
    s.add_argument("--backend", default="auto")
    s.add_argument("--threads", type=int, default=None,
                   help="PyTorch threads for the models (default: all cores but one, which is "
                        "left to the HTTP server)")
    s.add_argument("--max-batch-size", type=int, default=64)
    s.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                   help="longest a request waits for a fuller batch (deadlines may cut it)")
    s.add_argument("--preferred-batch-sizes", default="",
                   help="comma-separated batch sizes dispatched as soon as they can be formed")
    s.add_argument("--batch-buckets", default="",
                   help="batch sizes the engine runs; a batch is padded up to the next one "
                        "(default: powers of two, the preferred sizes and the max)")
    s.add_argument("--no-pad-batch", dest="pad_batch", action="store_false",
                   help="run batches at their exact size (each new size builds a plan)")
    s.add_argument("--length-buckets", default="",
                   help="padded lengths of variable-length dims (default: powers of two >= 8)")
    s.add_argument("--batching", choices=("deadline", "fixed"), default="deadline",
                   help="'deadline': batches formed from the requests' deadlines (default); "
                        "'fixed': the fixed-queue-delay baseline, for comparison")
    s.add_argument("--deadline-margin-ms", type=float, default=5.0,
                   help="time kept free before each deadline for wake-up and the reply")
    s.add_argument("--queue-limit", type=int, default=256,
                   help="queued requests per model before 429")
    s.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' (or set DEEPSEEK_SERVE_TOKEN)")
    s.add_argument("--max-request-bytes", type=int, default=64 << 20)
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to finish in-flight requests on shutdown")
    s.add_argument("--access-log", action="store_true")

    s = command("loadgen", cmd_loadgen, "open-loop Poisson load against a KServe v2 server: "
                                        "throughput, latency percentiles, deadline misses",
                LOADGEN_EXAMPLE)
    s.add_argument("--url", default="http://127.0.0.1:8000")
    s.add_argument("--model", required=True)
    s.add_argument("--rate", default="100", help="offered requests/s; a comma list sweeps")
    s.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    s.add_argument("--deadline-ms", type=float, default=50.0, help="per-request deadline "
                                                                   "(0: none)")
    s.add_argument("--length", type=int, default=16, help="size of variable-length dims")
    s.add_argument("--connections", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--token", default=None)
    s.add_argument("--out", default=None, help="folder for loadgen.png/.json/.txt")
