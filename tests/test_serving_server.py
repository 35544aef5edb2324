"""A real server on loopback (in this process, on a free port) and real clients:
tritonclient[http] unchanged, httpx for malformed requests, the load generator."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import deepseek as ds
from deepseek.examples import mnist_cnn
from deepseek.serving import loadgen
from deepseek.serving.server import ServeConfig, ServerThread, ServingState
from tests.conftest import rel_l2

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class SlowEngine:
    """An engine that takes ``delay`` seconds more per batch: a slow device, so that
    overload and draining happen at rates a 2-core test machine can offer."""

    def __init__(self, engine, delay: float):
        self.graph, self._engine, self._delay = engine.graph, engine, delay

    def run_flat(self, tensors):
        time.sleep(self._delay)
        return self._engine.run_flat(tensors)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("serving")
    model, (x,) = mnist_cnn(4)
    ds.compile(model, (x,), dynamic_dims={0: {0: "batch"}}, backend="cpu").save(str(d / "m.dsk"))
    static_model, (x1,) = mnist_cnn(1)
    ds.compile(static_model, (x1,), backend="cpu").save(str(d / "s.dsk"))
    return {"model": model, "dynamic": str(d / "m.dsk"), "static": str(d / "s.dsk")}


@pytest.fixture(scope="module")
def server(artifacts):
    cfg = ServeConfig(port=0, max_batch_size=16, max_queue_delay_ms=3,
                      preferred_batch_sizes=(4, 8), token=TOKEN, max_request_bytes=1 << 20)
    state = ServingState(cfg)
    state.add_model("mnist", ds.load(artifacts["dynamic"], backend="cpu"))
    state.add_model("mnist_static", ds.load(artifacts["static"], backend="cpu"))
    with ServerThread(state) as srv:
        yield srv


def _reference(model, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(x))


def _infer_body(x: np.ndarray, rid: str | None = None, **params) -> dict:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    if rid is not None:
        body["id"] = rid
    if params:
        body["parameters"] = params
    return body


def test_tritonclient_health_metadata_and_infer(server, artifacts):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready(headers=AUTH)
    assert client.is_model_ready("mnist", headers=AUTH)
    meta = client.get_server_metadata(headers=AUTH)
    assert "binary_tensor_data" in meta["extensions"]
    m = client.get_model_metadata("mnist", headers=AUTH)
    assert m["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert m["outputs"] == [{"name": "output0", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_config("mnist", headers=AUTH)["max_batch_size"] == 16

    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    ref = _reference(artifacts["model"], x)
    for binary in (True, False):
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("output0", binary_data=binary)
        r = client.infer("mnist", [inp], outputs=[out], request_id=f"req-{binary}",
                         model_version="1", priority=1, timeout=10_000_000,
                         headers=dict(AUTH))  # tritonclient adds its headers to this dict
        assert r.get_response()["id"] == f"req-{binary}"
        assert rel_l2(torch.from_numpy(r.as_numpy("output0").copy()), ref) < 1e-5

    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [inp], headers=dict(AUTH))
    assert e.value.status() == "404" and "unknown model 'nope'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("mnist")                      # no token
    assert e.value.status() == "401" and "bearer token" in e.value.message()


def test_model_without_a_batch_dim_is_served_one_request_at_a_time(server, artifacts):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.get_model_metadata("mnist_static", headers=AUTH)["inputs"][0]["shape"] == \
        [1, 1, 28, 28]
    assert client.get_model_config("mnist_static", headers=AUTH)["max_batch_size"] == 0
    x = np.random.default_rng(2).standard_normal((1, 1, 28, 28)).astype(np.float32)
    inp = triton.InferInput("x", [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(x)
    r = client.infer("mnist_static", [inp], headers=dict(AUTH))
    got = torch.from_numpy(r.as_numpy("output0").copy())
    assert rel_l2(got, _reference(artifacts["model"], x)) < 1e-5
    with httpx.Client(base_url=server.url, headers=AUTH) as c:
        bad = c.post("/v2/models/mnist_static/infer",
                     json=_infer_body(np.zeros((2, 1, 28, 28), np.float32)))
    assert bad.status_code == 400 and "dim 0 must be 1" in bad.json()["error"]


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server):
    good = _infer_body(np.zeros((1, 1, 28, 28), np.float32))
    cases = [
        ("POST", "/v2/models/mnist/infer", {"json": good}, {}, 401, "bearer token"),
        ("POST", "/v2/models/mnist/infer", {"json": good},
         {"Authorization": "Bearer wrong"}, 401, "bearer token"),
        ("POST", "/v2/models/nope/infer", {"json": good}, AUTH, 404, "unknown model"),
        ("GET", "/v2/models/mnist/versions/7", {}, AUTH, 404, "only version '1'"),
        ("POST", "/v2/models/mnist/infer", {"content": b'{"inputs": [ {'}, AUTH, 400,
         "malformed JSON"),
        ("POST", "/v2/models/mnist/infer",
         {"json": _infer_body(np.zeros((1, 1, 28, 27), np.float32))}, AUTH, 400, "dim 3"),
        ("POST", "/v2/models/mnist/infer",
         {"json": {"inputs": [{**good["inputs"][0], "datatype": "INT64"}]}}, AUTH, 400,
         "expects FP32"),
        ("POST", "/v2/models/mnist/infer",
         {"json": {"inputs": [{**good["inputs"][0], "name": "image"}]}}, AUTH, 400,
         "unknown: ['image']"),
        ("POST", "/v2/models/mnist/infer", {"content": b"0" * (2 << 20)}, AUTH, 413,
         "exceeds the limit"),
        ("GET", "/v3/whatever", {}, AUTH, 404, "Not Found"),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for method, path, kw, headers, status, words in cases:
            r = c.request(method, path, headers=headers, **kw)
            assert r.status_code == status, (path, r.text)
            assert words in r.json()["error"], (path, r.text)
        assert c.get("/v2/health/live").status_code == 200      # probes need no token
        r = c.post("/v2/models/mnist/infer", json=good, headers=AUTH)
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 10]


async def _post_all(url: str, bodies: list[dict], headers: dict) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                 timeout=60) as c:
        return await asyncio.gather(*(c.post("/v2/models/mnist/infer", json=b) for b in bodies))


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server, artifacts):
    xs = np.random.default_rng(3).standard_normal((24, 1, 1, 28, 28)).astype(np.float32)
    responses = asyncio.run(_post_all(server.url, [_infer_body(x, f"c{i}")
                                                   for i, x in enumerate(xs)], AUTH))
    sizes = []
    for i, (x, r) in enumerate(zip(xs, responses)):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == f"c{i}"
        got = torch.tensor(body["outputs"][0]["data"]).view(1, 10)
        assert rel_l2(got, _reference(artifacts["model"], x)) < 1e-5
        sizes.append(body["parameters"]["batch_size"])
    assert max(sizes) > 1  # some requests shared a batch


def test_big_bodies_are_parsed_and_encoded_off_the_event_loop(server, artifacts, monkeypatch):
    import deepseek.serving.server as server_module

    monkeypatch.setattr(server_module, "_OFFLOAD_BYTES", 0)  # every body counts as big
    x = np.random.default_rng(4).standard_normal((5, 1, 28, 28)).astype(np.float32)
    with httpx.Client(base_url=server.url, headers=AUTH) as c:
        r = c.post("/v2/models/mnist/infer", json=_infer_body(x, "big"))
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["outputs"][0]["data"]).view(5, 10)
    assert rel_l2(got, _reference(artifacts["model"], x)) < 1e-5


def test_deadline_that_cannot_be_met_is_refused_early(server):
    body = _infer_body(np.zeros((1, 1, 28, 28), np.float32), "hurry", deadline_ms=0.001)
    with httpx.Client(base_url=server.url, headers=AUTH) as c:
        r = c.post("/v2/models/mnist/infer", json=body)
        assert r.status_code == 504 and "deadline cannot be met" in r.json()["error"]
        assert r.json()["id"] == "hurry"
        ok = c.post("/v2/models/mnist/infer", json={**body, "parameters": {"deadline_ms": 5000}})
        assert ok.status_code == 200 and ok.json()["parameters"]["deadline_missed"] is False
        metrics = c.get("/metrics").text
    assert loadgen._metric(metrics, "deepseek_refused_total", "mnist", reason="deadline") >= 1
    assert loadgen._metric(metrics, "deepseek_requests_total", "mnist",
                           outcome="deadline_refused") >= 1


def test_metrics_cover_outcomes_latencies_batches_and_busy_time(server):
    with httpx.Client(base_url=server.url, headers=AUTH) as c:
        c.post("/v2/models/mnist/infer", json=_infer_body(np.zeros((2, 1, 28, 28), np.float32)))
        text = c.get("/metrics").text
        assert c.get("/metrics", headers={"Authorization": ""}).status_code == 401
    for name in ("deepseek_request_queue_seconds_bucket", "deepseek_request_compute_seconds_count",
                 "deepseek_request_total_seconds_sum", "deepseek_batch_size_bucket",
                 "deepseek_deadline_misses_total", "deepseek_device_busy_fraction",
                 "deepseek_queue_depth"):
        assert name in text, name
    assert loadgen._metric(text, "deepseek_requests_total", "mnist", outcome="ok") >= 1
    assert loadgen._metric(text, "deepseek_requests_total", "_unknown", outcome="bad_request") >= 1
    assert loadgen._metric(text, "deepseek_requests_total", "mnist", outcome="unauthorized") >= 1
    assert loadgen._metric(text, "deepseek_batch_size_count", "mnist") >= 1
    assert loadgen._metric(text, "deepseek_device_busy_seconds_total", "mnist") > 0
    assert 0 < loadgen._metric(text, "deepseek_device_busy_fraction", "mnist") <= 1


@pytest.fixture
def slow_server(artifacts, request):
    """A server whose one model runs on a slow device (``request.param``: ServeConfig args)."""
    delay, kwargs = request.param
    state = ServingState(ServeConfig(port=0, warmup=False, **kwargs))
    state.add_model("mnist", SlowEngine(ds.load(artifacts["dynamic"], backend="cpu"), delay))
    srv = ServerThread(state).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("slow_server", [(0.02, {"max_batch_size": 4, "queue_limit": 6,
                                                     "max_queue_delay_ms": 2})], indirect=True)
def test_overload_answers_every_request_exactly_once(slow_server):
    """Offered ~2x what the slow device can do: the queue limit answers 429, hopeless
    deadlines 504, the rest are served; no id is lost, answered twice or mixed up, and the
    server counted each answer once."""
    async def go():
        async with loadgen.client_session() as client:
            async with client.get(f"{slow_server.url}/v2/models/mnist") as meta:
                build = loadgen.make_body_factory(await meta.json())
            return await loadgen.run_rate(client, slow_server.url, "mnist", rate=400,
                                          duration=1.5, deadline_ms=150, build=build)

    r = asyncio.run(go())
    assert r.sent > 300
    assert r.lost == 0 and r.duplicated == 0 and r.mismatched == 0, r
    assert r.ok + r.deadline_refused + r.rejected + r.errors == r.sent
    assert r.errors == 0 and set(r.statuses) <= {200, 429, 504}, r.statuses
    assert r.rejected > 0 and r.ok > 0
    assert r.server_answered == r.sent
    assert 0.3 < r.busy_fraction <= 1.05


@pytest.mark.parametrize("slow_server", [(0.05, {"max_batch_size": 2, "queue_limit": 64,
                                                     "max_queue_delay_ms": 20_000})],
                         indirect=True)
def test_shutdown_drains_in_flight_requests(slow_server):
    """Requests wait in the queue (a 20 s queue delay) when shutdown begins: every one is
    run and answered, the listener closes, and draining did not wait out the delay."""
    n, results = 6, []

    def send():
        results.extend(asyncio.run(_post_all(slow_server.url, [
            _infer_body(np.zeros((1, 1, 28, 28), np.float32), f"d{i}") for i in range(n)], {})))

    sender = threading.Thread(target=send)
    sender.start()
    worker = slow_server.state.workers["mnist"]
    deadline = time.monotonic() + 30
    while len(worker._queue) < n - 2 and time.monotonic() < deadline:  # most are queued
        time.sleep(0.01)
    t0 = time.monotonic()
    slow_server.stop()
    sender.join(60)
    assert time.monotonic() - t0 < 15
    assert sorted(r.status_code for r in results) == [200] * n, [r.text for r in results]
    assert sorted(r.json()["id"] for r in results) == sorted(f"d{i}" for i in range(n))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", slow_server.port), timeout=2).close()
