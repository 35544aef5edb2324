"""``deepseek serve`` and ``deepseek loadgen`` as separate processes: start, serve a real
client, load test, drain on SIGTERM with requests in flight, exit 0."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from deepseek.cli import build_parser

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
TOKEN = "tok-123"


def _lines(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)


@pytest.fixture(scope="module")
def dsk(tmp_path_factory):
    import deepseek as ds
    from deepseek.examples import mnist_cnn

    d = tmp_path_factory.mktemp("serve_cli")
    model, (x,) = mnist_cnn(4)
    path = str(d / "digits.dsk")
    ds.compile(model, (x,), dynamic_dims={0: {0: "batch"}}, backend="cpu").save(path)
    return path


@pytest.fixture(scope="module")
def served(dsk):
    """``deepseek serve`` on a free port; requests without deadline wait up to 3 s for a
    batch, so that shutdown finds them in flight."""
    p = subprocess.Popen([sys.executable, "-m", "deepseek.cli", "serve", dsk, "--port", "0",
                          "--token", TOKEN, "--max-batch-size", "32",
                          "--max-queue-delay-ms", "3000", "--preferred-batch-sizes", "8,16"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    out: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(p.stdout, out), daemon=True).start()
    url, seen, deadline = None, [], time.monotonic() + 90
    while url is None and time.monotonic() < deadline and p.poll() is None:
        try:
            line = out.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if "listening on " in line:
            url = line.split("listening on ")[1].split()[0]
    if url is None:
        p.kill()
        pytest.fail("deepseek serve did not start:\n" + "".join(seen))
    while time.monotonic() < deadline:  # ready once warmed up
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    yield {"proc": p, "url": url, "out": out, "seen": seen}
    if p.poll() is None:
        p.kill()
        p.wait(10)


def test_help_of_the_serving_commands(capsys):
    for cmd in ("serve", "loadgen"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        assert f"deepseek {cmd}" in text and "example:" in text


def test_import_deepseek_stays_light():
    code = ("import sys, deepseek, deepseek.cli, deepseek.serving; deepseek.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'httpx', 'aiohttp') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_served_model_answers_tritonclient(served):
    client = triton.InferenceServerClient(served["url"].removeprefix("http://"))
    assert client.is_server_ready()
    x = np.zeros((2, 1, 28, 28), np.float32)
    inp = triton.InferInput("x", [2, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(x)
    # a deadline cuts the 3 s queue delay short
    r = client.infer("digits", [inp], headers={"Authorization": f"Bearer {TOKEN}"},
                     parameters={"deadline_ms": 500})
    assert r.as_numpy("output0").shape == (2, 10)


def test_loadgen_sweep_writes_table_json_and_plot(served, tmp_path):
    r = subprocess.run([sys.executable, "-m", "deepseek.cli", "loadgen", "--url", served["url"],
                        "--model", "digits", "--rate", "20,60", "--duration", "1",
                        "--deadline-ms", "200", "--token", TOKEN, "--out", str(tmp_path)],
                       capture_output=True, text=True, env=ENV, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "offered/s" in r.stdout and "p99 ms" in r.stdout
    import json

    rows = json.loads((tmp_path / "loadgen.json").read_text())
    assert [row["rate"] for row in rows] == [20, 60]
    assert all(row["lost"] == 0 and row["duplicated"] == 0 and row["ok"] > 0 for row in rows)
    assert all(row["server_answered"] == row["sent"] for row in rows)
    assert (tmp_path / "loadgen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_drains_in_flight_requests_then_exits_0(served):
    url, p = served["url"], served["proc"]
    n, results = 5, []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                        "data": [0.0] * 784}]}

    def send(i):
        with httpx.Client(timeout=60) as c:
            results.append(c.post(f"{url}/v2/models/digits/infer", headers=headers,
                                  json={**body, "id": f"q{i}"}))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until they are queued (3 s queue delay)
        metrics = httpx.get(f"{url}/metrics", headers=headers).text
        depth = [line for line in metrics.splitlines()
                 if line.startswith('deepseek_queue_depth{model="digits"}')]
        if depth and float(depth[0].split()[-1]) >= n:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert p.wait(60) == 0
    assert sorted(r.status_code for r in results) == [200] * n
    assert sorted(r.json()["id"] for r in results) == [f"q{i}" for i in range(n)]
    tail = []
    while not served["out"].empty():
        tail.append(served["out"].get())
    assert any("drained and stopped" in line for line in tail), tail
