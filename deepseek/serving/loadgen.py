"""Open-loop load generator for a KServe v2 server (``deepseek loadgen``).

Requests arrive as a Poisson process at the offered rate, whether or not
earlier ones were answered (open loop: a slow server cannot slow the
arrivals down, so its queueing shows). Each request carries a deadline
(``parameters.deadline_ms``) and a unique id; latency is measured from the
*scheduled* arrival, so client-side delays count against the server rather
than hiding (no coordinated omission). Reports throughput, goodput (answers
within their deadline per second), p50/p95/p99 latency of served requests,
the deadline-miss rate (requests not served within their deadline, refusals
included), the device busy fraction (from the server's
``deepseek_device_busy_seconds_total``) and the answer accounting: every id
must get exactly one answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RateResult:
    """What one offered rate produced."""

    rate: float
    duration_s: float
    sent: int = 0
    ok: int = 0
    late: int = 0
    deadline_refused: int = 0
    rejected: int = 0                # 429 queue full, 503 unavailable
    errors: int = 0                  # other statuses, transport errors
    lost: int = 0                    # no answer by the end of the run
    duplicated: int = 0              # an id answered more than once
    mismatched: int = 0              # an answer carrying another request's id
    server_answered: int | None = None  # the server's count of answers over the run
    throughput: float = 0.0          # served requests per second
    goodput: float = 0.0             # served within deadline, per second
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    miss_rate: float = 0.0
    busy_fraction: float | None = None
    statuses: dict = field(default_factory=dict)


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    return float(np.percentile(np.asarray(xs), q))


def make_body_factory(metadata: dict, length: int = 16, int_high: int = 2, seed: int = 0):
    """A function ``id -> (body, headers)`` building a one-row binary infer request
    for a model from its KServe metadata (symbolic dims: 1 row, ``length`` elsewhere)."""
    rng = np.random.default_rng(seed)
    np_types = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
                "INT32": np.int32, "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8,
                "BOOL": np.bool_}
    inputs, blobs = [], []
    for k, info in enumerate(metadata["inputs"]):
        shape = [d if d >= 0 else (1 if i == 0 else length) for i, d in enumerate(info["shape"])]
        t = np_types.get(info["datatype"])
        if t is None:
            raise ValueError(f"loadgen cannot make {info['datatype']} inputs")
        if "mask" in info["name"].lower():
            arr = np.ones(shape, dtype=t)
        elif np.issubdtype(t, np.floating):
            arr = rng.standard_normal(shape).astype(t)
        else:
            arr = rng.integers(0, int_high, size=shape).astype(t)
        raw = arr.tobytes()
        blobs.append(raw)
        inputs.append({"name": info["name"], "shape": shape, "datatype": info["datatype"],
                       "parameters": {"binary_data_size": len(raw)}})
    blob = b"".join(blobs)
    outputs = [{"name": o["name"], "parameters": {"binary_data": True}}
               for o in metadata["outputs"]]

    def build(request_id: str, deadline_ms: float | None) -> tuple[bytes, dict]:
        head = {"id": request_id, "inputs": inputs, "outputs": outputs}
        if deadline_ms is not None:
            head["parameters"] = {"deadline_ms": deadline_ms}
        h = json.dumps(head, separators=(",", ":")).encode()
        return h + blob, {"Inference-Header-Content-Length": str(len(h)),
                          "Content-Type": "application/octet-stream"}

    return build


def _metric(text: str, name: str, model: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.index("}")]))
        if found.get("model") == model and all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def run_rate(client, url: str, model: str, rate: float, duration: float,
                   deadline_ms: float | None, build, seed: int = 0,
                   settle_s: float = 10.0) -> RateResult:
    """Offer ``rate`` requests/s for ``duration`` seconds (Poisson arrivals) through
    ``client`` (a :func:`client_session`); ``build(id, deadline_ms) -> (body, headers)``
    makes each request (see :func:`make_body_factory`)."""
    rng = random.Random(seed)
    res = RateResult(rate=rate, duration_s=duration)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration:
        arrivals.append(t)
        t += rng.expovariate(rate)
    prefix = f"r{rate:g}-s{seed}-"
    answers: dict[str, int] = {}
    served_ms: list[float] = []
    infer_url = f"{url}/v2/models/{model}/infer"

    async def scrape() -> str | None:
        try:
            async with client.get(f"{url}/metrics") as r:
                return await r.text() if r.status == 200 else None
        except Exception:  # noqa: BLE001  (no metrics: the busy fraction is reported n/a)
            return None

    async def one(i: int, scheduled: float) -> None:
        rid = f"{prefix}{i}"
        body, headers = build(rid, deadline_ms)
        try:
            async with client.post(infer_url, data=body, headers=headers) as r:
                status, content = r.status, await r.read()
                hlen = r.headers.get("inference-header-content-length")
        except Exception as e:  # noqa: BLE001  (any failure means no answer: counted as lost)
            res.statuses[type(e).__name__] = res.statuses.get(type(e).__name__, 0) + 1
            return
        latency_ms = (loop.time() - scheduled) * 1e3
        res.statuses[status] = res.statuses.get(status, 0) + 1
        try:
            head = json.loads(content[:int(hlen)] if hlen else content)
        except ValueError:
            head = {}
        got = head.get("id", rid)
        if got != rid:
            res.mismatched += 1
        answers[got] = answers.get(got, 0) + 1
        if status == 200:
            res.ok += 1
            served_ms.append(latency_ms)
            if deadline_ms is not None and latency_ms > deadline_ms:
                res.late += 1
        elif status == 504:
            res.deadline_refused += 1
        elif status in (429, 503):
            res.rejected += 1
        else:
            res.errors += 1

    loop = asyncio.get_running_loop()
    before = await scrape()
    start = loop.time()
    tasks = []
    for i, at in enumerate(arrivals):
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, start + at)))
    res.sent = len(tasks)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=settle_s)
        for p in pending:
            p.cancel()
    wall = max(loop.time() - start, 1e-9)
    after = await scrape()
    res.lost = sum(1 for i in range(res.sent) if f"{prefix}{i}" not in answers)
    res.duplicated = sum(1 for n in answers.values() if n > 1)
    res.throughput = res.ok / duration
    good = [x for x in served_ms if deadline_ms is None or x <= deadline_ms]
    res.goodput = len(good) / duration
    res.p50_ms, res.p95_ms, res.p99_ms = (_percentile(served_ms, q) for q in (50, 95, 99))
    res.miss_rate = 1.0 - len(good) / res.sent if res.sent else 0.0
    if before is not None and after is not None:
        busy = _metric(after, "deepseek_device_busy_seconds_total", model) - \
            _metric(before, "deepseek_device_busy_seconds_total", model)
        res.busy_fraction = busy / wall
        res.server_answered = int(_metric(after, "deepseek_requests_total", model) -
                                  _metric(before, "deepseek_requests_total", model))
    return res


def client_session(token: str | None = None, connections: int = 256):
    """An aiohttp session for :func:`run_rate` (aiohttp: a client that costs ~0.2 ms of
    CPU per request, so the generator is not the bottleneck on a small machine)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return aiohttp.ClientSession(headers=headers,
                                 connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=30.0))


async def _sweep(url: str, model: str, rates: list[float], duration: float,
                 deadline_ms: float | None, token: str | None, length: int, seed: int,
                 connections: int) -> list[RateResult]:
    async with client_session(token, connections) as client:
        async with client.get(f"{url}/v2/models/{model}") as r:
            if r.status != 200:
                raise RuntimeError(f"GET {url}/v2/models/{model}: {r.status} {await r.text()}")
            build = make_body_factory(await r.json(), length=length, seed=seed)
        results = []
        for k, rate in enumerate(rates):
            results.append(await run_rate(client, url, model, rate, duration, deadline_ms,
                                          build, seed=seed + k))
        return results


def sweep(url: str, model: str, rates: list[float], duration: float = 5.0,
          deadline_ms: float | None = 50.0, token: str | None = None, length: int = 16,
          seed: int = 0, connections: int = 256) -> list[RateResult]:
    """Run each offered rate in turn against ``url``; one :class:`RateResult` per rate.

    Example::

        results = sweep("http://127.0.0.1:8000", "mnist", [100, 400], duration=5)
        print(format_table(results))
    """
    return asyncio.run(_sweep(url, model, rates, duration, deadline_ms, token, length, seed,
                              connections))


def format_table(results: list[RateResult]) -> str:
    head = (f"{'offered/s':>9} {'sent':>6} {'thru/s':>8} {'good/s':>8} {'p50 ms':>8} "
            f"{'p95 ms':>8} {'p99 ms':>8} {'miss':>6} {'refused':>7} {'429/503':>7} "
            f"{'busy':>5} {'lost':>4} {'dup':>3}")
    lines = [head]
    for r in results:
        busy = f"{r.busy_fraction:5.2f}" if r.busy_fraction is not None else "  n/a"
        lines.append(f"{r.rate:9.0f} {r.sent:6d} {r.throughput:8.1f} {r.goodput:8.1f} "
                     f"{r.p50_ms:8.2f} {r.p95_ms:8.2f} {r.p99_ms:8.2f} {r.miss_rate:6.1%} "
                     f"{r.deadline_refused:7d} {r.rejected:7d} {busy} {r.lost:4d} "
                     f"{r.duplicated:3d}")
    return "\n".join(lines)


def to_json(results: list[RateResult]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v)
             for k, v in asdict(r).items() if k != "statuses"}
            | {"statuses": {str(k): v for k, v in r.statuses.items()}} for r in results]


def plot(results: list[RateResult], path: str, title: str = "") -> None:
    """Latency percentiles and throughput/goodput against offered load, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r.rate for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for q, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        a.plot(rates, [getattr(r, f"{q}_ms") for r in results], style, label=q)
    a.set_xlabel("offered load (requests/s)")
    a.set_ylabel("latency of served requests (ms)")
    a.set_yscale("log")
    a.grid(True, which="both", alpha=0.3)
    a.legend()
    b.plot(rates, rates, color="0.7", lw=1, label="offered")
    b.plot(rates, [r.throughput for r in results], "o-", label="throughput")
    b.plot(rates, [r.goodput for r in results], "s-", label="goodput (within deadline)")
    b.set_xlabel("offered load (requests/s)")
    b.set_ylabel("requests/s")
    b.grid(True, alpha=0.3)
    b.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
