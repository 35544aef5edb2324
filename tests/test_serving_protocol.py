"""KServe v2 request parsing and response encoding, and the batcher's padding of
variable-length inputs with masks (a real engine, no HTTP)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deepseek as ds
from deepseek.serving.batcher import ModelWorker, Rejected
from deepseek.serving.policy import BatchConfig
from deepseek.serving.protocol import (
    ModelSignature,
    ProtocolError,
    decode_body,
    encode_infer_response,
    parse_infer_request,
)
from tests.conftest import rel_l2


class Tagger(torch.nn.Module):
    """Token ids and an attention mask -> per-token scores (B, S, 4) and a masked mean (B, 4)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask):
        h = self.lin(self.emb(input_ids))                    # (B, S, 4)
        m = attention_mask.unsqueeze(-1).to(h.dtype)         # (B, S, 1)
        return {"tokens": h, "pooled": (h * m).sum(1) / m.sum(1).clamp_min(1.0)}


@pytest.fixture(scope="module")
def tagger():
    torch.manual_seed(0)
    model = Tagger().eval()
    ids, mask = torch.randint(0, 50, (2, 5)), torch.ones(2, 5, dtype=torch.int64)
    dyn = {0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "seq"}}
    return model, ds.compile(model, (ids, mask), dynamic_dims=dyn, backend="cpu")


@pytest.fixture(scope="module")
def mnist_sig():
    from deepseek.examples import mnist_cnn

    model, (x,) = mnist_cnn(2)
    engine = ds.compile(model, (x,), dynamic_dims={0: {0: "batch"}}, backend="cpu")
    return ModelSignature.from_engine(engine, "mnist", max_batch_size=8)


def _json_request(x: np.ndarray, name="x", datatype="FP32", **extra) -> bytes:
    return json.dumps({"id": "r1", "inputs": [{"name": name, "shape": list(x.shape),
                                               "datatype": datatype,
                                               "data": x.ravel().tolist()}], **extra}).encode()


def _binary_request(x: np.ndarray, outputs=None) -> tuple[bytes, str]:
    head = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}]}
    if outputs:
        head["outputs"] = outputs
    h = json.dumps(head).encode()
    return h + x.tobytes(), str(len(h))


def test_signature_of_a_batched_model(mnist_sig, tagger):
    assert mnist_sig.batch_symbol == "batch" and mnist_sig.max_batch_size == 8
    assert [o.name for o in mnist_sig.outputs] == ["output0"]
    sig = ModelSignature.from_engine(tagger[1], "tagger", 16)
    assert sig.padded == {"seq": ()}                 # the mask makes 'seq' paddable
    assert [o.name for o in sig.outputs] == ["tokens", "pooled"]  # the model's dict keys


def test_json_and_binary_requests_parse_to_the_same_tensor(mnist_sig):
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    a = parse_infer_request(_json_request(x, parameters={"deadline_ms": 40, "priority": 2}),
                            None, mnist_sig)
    body, hlen = _binary_request(x)
    b = parse_infer_request(body, hlen, mnist_sig)
    assert torch.equal(a.tensors[0], torch.from_numpy(x)) and torch.equal(b.tensors[0], a.tensors[0])
    assert (a.rows, a.id, a.deadline_ms, a.priority) == (3, "r1", 40.0, 2)
    # Triton's timeout parameter (microseconds) is a deadline too
    t = parse_infer_request(_json_request(x, parameters={"timeout": 25000}), None, mnist_sig)
    assert t.deadline_ms == 25.0


def test_binary_response_round_trip(mnist_sig):
    x = np.zeros((2, 1, 28, 28), np.float32)
    body, hlen = _binary_request(x, outputs=[{"name": "output0",
                                              "parameters": {"binary_data": True}}])
    req = parse_infer_request(body, hlen, mnist_sig)
    out = torch.randn(2, 10)
    data, headers = encode_infer_response(mnist_sig, req, [out])
    n = int(headers["inference-header-content-length"])
    head = json.loads(data[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 80
    assert torch.equal(torch.frombuffer(bytearray(data[n:]), dtype=torch.float32).view(2, 10), out)
    req.outputs = [(0, False)]
    data, headers = encode_infer_response(mnist_sig, req, [out])
    assert headers["content-type"] == "application/json"
    assert np.allclose(json.loads(data)["outputs"][0]["data"], out.ravel().tolist())


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "'inputs' list"),
    (json.dumps({"inputs": [{"name": "y", "shape": [1, 1, 28, 28], "datatype": "FP32",
                             "data": [0] * 784}]}).encode(), 400, "unknown: ['y']"),
    (json.dumps({"inputs": []}).encode(), 400, "missing: ['x']"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP64",
                             "data": [0] * 784}]}).encode(), 400, "expects FP32"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 27, 28], "datatype": "FP32",
                             "data": [0] * 756}]}).encode(), 400, "dim 2 must be 28"),
    (json.dumps({"inputs": [{"name": "x", "shape": [9, 1, 28, 28], "datatype": "FP32",
                             "data": [0] * 784 * 9}]}).encode(), 400, "max batch size"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                             "data": [0] * 700}]}).encode(), 400, "needs 784"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                             "data": ["a"] * 784}]}).encode(), 400, "FP32 values"),
    (_json_request(np.zeros((1, 1, 28, 28)), parameters={"deadline_ms": -3}), 400, "deadline_ms"),
    (_json_request(np.zeros((1, 1, 28, 28)), parameters={"priority": "high"}), 400, "priority"),
    (_json_request(np.zeros((1, 1, 28, 28)), outputs=[{"name": "nope"}]), 400, "unknown output"),
])
def test_bad_requests_name_the_problem(mnist_sig, body, status, words):
    with pytest.raises(ProtocolError) as e:
        parse_infer_request(body, None, mnist_sig)
    assert e.value.status == status and words in e.value.message


def test_bad_binary_parts(mnist_sig):
    x = np.zeros((1, 1, 28, 28), np.float32)
    body, hlen = _binary_request(x)
    for b, h, words in [(body[:-4], hlen, "ends after"), (body + b"xx", hlen, "add up to"),
                        (body, "999999", "Inference-Header-Content-Length"),
                        (body, "abc", "Inference-Header-Content-Length")]:
        with pytest.raises(ProtocolError, match=words):
            parse_infer_request(b, h, mnist_sig)


def test_compressed_bodies_are_bounded():
    import gzip

    assert decode_body(gzip.compress(b"hello"), "gzip", 100) == b"hello"
    with pytest.raises(ProtocolError) as e:
        decode_body(gzip.compress(b"\0" * 10_000), "gzip", 100)   # a small zip bomb
    assert e.value.status == 413
    with pytest.raises(ProtocolError) as e:
        decode_body(b"abc", "br", 100)
    assert e.value.status == 415


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400).map(str)))
def test_garbage_only_ever_raises_protocol_errors(mnist_sig, body, hlen):
    try:
        parse_infer_request(body, hlen, mnist_sig)
    except ProtocolError as e:
        assert 400 <= e.status < 500 and e.message


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=4),
                    max_leaves=20))
def test_garbage_json_only_ever_raises_protocol_errors(mnist_sig, doc):
    for body in (json.dumps(doc).encode(), json.dumps({"inputs": [doc]}).encode(),
                 json.dumps({"inputs": [{"name": "x", "shape": doc, "datatype": "FP32",
                                         "data": doc}]}).encode()):
        try:
            parse_infer_request(body, None, mnist_sig)
        except ProtocolError as e:
            assert 400 <= e.status < 500


def test_variable_lengths_are_bucketed_padded_and_cut_back(tagger):
    """Requests of lengths 3..12 batch in length buckets 8 and 16, padded with zeros (the
    mask marks the padding); each answer equals the model run on that request alone."""
    model, engine = tagger
    sig = ModelSignature.from_engine(engine, "tagger", 16)
    worker = ModelWorker(engine, sig, BatchConfig(max_batch_size=16, max_queue_delay=10.0,
                                                      batch_buckets=(4, 16)),
                         queue_limit=64)
    lengths = [3, 5, 9, 12, 7, 16]
    requests = [(torch.randint(1, 50, (1, n)), torch.ones(1, n, dtype=torch.int64))
                for n in lengths]
    answers, done = {}, threading.Event()

    def collect(i):
        def on_done(outcome):
            answers[i] = outcome
            if len(answers) == len(lengths):
                done.set()
        return on_done

    worker.start()
    assert worker.wait_ready(30)
    for i, (ids, mask) in enumerate(requests):
        worker.submit(str(i), [ids, mask], 1, {"batch": 1, "seq": lengths[i]}, collect(i))
    worker.stop(timeout=30)  # drains: every queued request runs now
    assert done.wait(30)
    with pytest.raises(Rejected) as e:
        worker.submit("late", list(requests[0]), 1, {"batch": 1, "seq": 3}, collect(99))
    assert e.value.status == 503
    for i, (ids, mask) in enumerate(requests):
        out = answers[i]
        assert out.status == "ok", out.message
        with torch.no_grad():
            ref = model(ids, mask)
        tokens, pooled = out.outputs
        assert tokens.shape == (1, lengths[i], 4) and pooled.shape == (1, 4)
        assert rel_l2(tokens, ref["tokens"]) < 1e-5 and rel_l2(pooled, ref["pooled"]) < 1e-5
    # lengths <= 8 share one batch (bucket 8), the others another (bucket 16); each batch
    # of 3 rows runs padded to the batch bucket 4
    short, long = [answers[i] for i in (0, 1, 4)], [answers[i] for i in (2, 3, 5)]
    assert {a.batch_rows for a in short + long} == {4}
    # one batch each: its members share the one measured compute time
    assert len({a.compute_s for a in short}) == 1 and len({a.compute_s for a in long}) == 1
    assert short[0].compute_s != long[0].compute_s
